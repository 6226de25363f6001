"""Push a folder that nlsr-hub wrote (`nlsr realign`, `nlsr patch`) as it is, merging its card into the repo's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub import PushToHubMixin


@dataclass(frozen=True)
class SavedFolder(PushToHubMixin):
    """A folder written by nlsr-hub (`nlsr realign` or `nlsr patch`), pushed as is; its model card is merged
    into the repo's existing one, so the user's text stays. Nothing in `path` is modified."""

    path: Path

    def __post_init__(self) -> None:
        if not self.path.is_dir() or not any(self.path.iterdir()):
            raise ValueError(f"Nothing to push: {self.path} is not a folder with files; write it with `nlsr realign`.")

    def _write_for_hub(self, folder: Path, repo_id: str, existing: Any | None) -> None:
        import shutil

        from huggingface_hub import ModelCard

        from .card import merge_cards

        shutil.copytree(self.path, folder, dirs_exist_ok=True)
        card_path = folder / "README.md"
        if card_path.is_file() and existing is not None:
            merged = merge_cards(existing, ModelCard(card_path.read_text(encoding="utf-8")))
            card_path.write_text(str(merged), encoding="utf-8")

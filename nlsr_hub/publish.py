"""Push a folder that nlsr-hub wrote (`nlsr realign`, `nlsr patch`, `nlsr reference`), merging its card into the
repo's. Only the files such a result consists of are uploaded (an allow-list: never dotfiles such as ``.env``, never
other files or subfolders), and only after they are checked: a tampered plan or config, NaN weights or a plan that
does not match the adapter are refused before anything is sent."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_FOLDER_FILES, CONFIG_NAME
from .hub import PushToHubMixin
from .safety_patch import PATCH_FOLDER_FILES, PATCH_META_NAME

logger = logging.getLogger(__name__)


def push_files() -> tuple[str, ...]:
    """Every file name `SavedFolder` may upload: those of a realigned result, a safety patch and an adapter."""
    from .result import RESULT_FILES

    return tuple(sorted({*RESULT_FILES, *PATCH_FOLDER_FILES, *ADAPTER_FOLDER_FILES}))


@dataclass(frozen=True)
class SavedFolder(PushToHubMixin):
    """A folder written by nlsr-hub, pushed as it is: the allow-listed files only, checked first; its model card is
    merged into the repo's existing one, so the user's text stays. Nothing in `path` is modified."""

    path: Path

    def __post_init__(self) -> None:
        if not self.path.is_dir():
            raise ValueError(f"Nothing to push: {self.path} is not a folder; write one with `nlsr realign`.")
        if not self.files():
            raise ValueError(f"Nothing to push: {self.path} holds none of the files of an nlsr-hub result "
                             f"({', '.join(push_files())}); write it with `nlsr realign` or `nlsr patch`.")
        links = [name for name in push_files() if (self.path / name).is_symlink()]
        if links:
            raise ValueError(f"{self.path}: {', '.join(links)} is a symbolic link; `nlsr push` uploads regular files "
                             "only, so copy the file in.")
        self.check()
        skipped = sorted(set(p.name for p in self.path.iterdir()) - set(self.files()))
        if skipped:
            logger.warning("not uploaded (not part of an nlsr-hub result): %s", ", ".join(skipped))

    def files(self) -> list[str]:
        """The allow-listed regular files present in the folder, sorted: what is uploaded."""
        return [name for name in push_files() if (self.path / name).is_file() and not (self.path / name).is_symlink()]

    def check(self) -> None:
        """Read back what will be uploaded with the library's own checks (a `ValueError` names the problem)."""
        from .adapters import load_adapter
        from .config import NLSRConfig
        from .io import read_text_file
        from .patch import check_plan_modules
        from .plan import PLAN_NAME, RealignmentPlan
        from .result import CONFIG_FILE_NAME
        from .safety_patch import SafetyPatch

        if (self.path / PATCH_META_NAME).exists():
            SafetyPatch.from_pretrained(self.path)
        if not (self.path / CONFIG_NAME).exists():
            if not (self.path / PATCH_META_NAME).exists():
                raise ValueError(f"Nothing to push: {self.path} holds neither an adapter ({CONFIG_NAME}) nor a safety "
                                 f"patch ({PATCH_META_NAME}).")
            return
        adapter = load_adapter(self.path)  # safetensors only: a pickled adapter is never pushed from here
        if (self.path / PLAN_NAME).exists():
            check_plan_modules(RealignmentPlan.load(self.path / PLAN_NAME), adapter)
        if (self.path / CONFIG_FILE_NAME).exists():
            text = read_text_file(self.path / CONFIG_FILE_NAME, "Config file")
            try:
                NLSRConfig.from_json(text)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{self.path / CONFIG_FILE_NAME}: {err}") from None

    def _write_for_hub(self, folder: Path, repo_id: str, existing: Any | None) -> None:
        import shutil

        from huggingface_hub import ModelCard

        from .card import merge_cards

        for name in self.files():
            shutil.copyfile(self.path / name, folder / name)
        card_path = folder / "README.md"
        if card_path.is_file() and existing is not None:
            merged = merge_cards(existing, ModelCard(card_path.read_text(encoding="utf-8")))
            card_path.write_text(str(merged), encoding="utf-8")

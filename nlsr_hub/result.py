"""`RealignmentResult`: the plan and the realigned adapter, savable as a stock PEFT adapter folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, write_adapter_files
from .card import PLOT_NAME, render_card
from .config import NLSRConfig
from .hub import PushToHubMixin, lineage_paths
from .io import atomic_directory, atomic_write_bytes, atomic_write_text, check_not_an_input
from .plan import PLAN_NAME, RealignmentPlan
from .plot import similarity_heatmap_png
from .safety_patch import SafetyPatch

CONFIG_FILE_NAME = "nlsr_config.json"
# every file of a saved result (what a re-save may replace, and what `nlsr push` uploads)
RESULT_FILES = (CONFIG_NAME, WEIGHTS_NAME, PLAN_NAME, CONFIG_FILE_NAME, PLOT_NAME, "README.md")


@dataclass(frozen=True)
class RealignmentResult(PushToHubMixin):
    """What `NLSRPatcher.realign` returns. `adapter` is None for a dry run. `push_to_hub(repo_id, ...)`
    uploads the saved folder in one commit."""

    _commit_message = "Upload NLSR-realigned adapter"

    plan: RealignmentPlan
    adapter: LoraAdapter | None
    config: NLSRConfig
    safety_patch: SafetyPatch | None = None
    eval_results: Sequence[Any] = field(default_factory=tuple)

    @property
    def base_model(self) -> str | None:
        """The base model's Hub id for the card's ``base_model`` (None when only a local path is known)."""
        from .refs import InputRef

        base = dict(self.plan.inputs).get("base") or {}
        candidates = [base.get("repo_id"), base.get("spec"),
                      self.adapter.base_model_name_or_path if self.adapter is not None else None]
        for candidate in candidates:
            try:
                if candidate and not InputRef.parse(candidate).is_local:
                    return InputRef.parse(candidate).repo_id
            except ValueError:
                continue
        return None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> RealignmentResult:
        """A result that `save_pretrained` wrote to the local `folder` (plan, config and adapter; never pickle)."""
        from .adapters import load_adapter

        folder = Path(folder)
        missing = [n for n in (PLAN_NAME, CONFIG_FILE_NAME, "adapter_config.json") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"`{folder}` is not a saved realignment result: {', '.join(missing)} missing "
                                    "(write one with `RealignmentResult.save_pretrained`).")
        config = NLSRConfig.from_json((folder / CONFIG_FILE_NAME).read_text(encoding="utf-8"))
        return cls(plan=RealignmentPlan.load(folder / PLAN_NAME), adapter=load_adapter(folder), config=config)

    def model_card(self, repo_id: str | None = None, *, existing: Any | None = None) -> Any:
        """The huggingface_hub `ModelCard` rendered from the plan (updating `existing` if given)."""
        return render_card(self.plan, base_model=self.base_model, repo_id=repo_id,
                           eval_results=self.eval_results, existing=existing)

    def with_eval_results(self, eval_results: Sequence[Any]) -> RealignmentResult:
        """A copy whose model card reports `eval_results` (huggingface_hub `EvalResult`s)."""
        return dataclasses.replace(self, eval_results=tuple(eval_results))

    def save_pretrained(
        self, save_directory: str | Path, *, repo_id: str | None = None, existing_card: Any | None = None
    ) -> Path:
        """Write the adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``nlsr_plan.json``,
        ``nlsr_config.json``, the similarity plot and a ``README.md`` model card, and the same inputs give the same
        bytes. The folder is written beside `save_directory` and swapped in as a whole: `save_directory` must be
        new, empty or an earlier result (never a folder holding other files), and never one of the plan's local
        inputs or a folder inside or around one."""
        if self.adapter is None:
            raise ValueError("This result comes from a dry run and has no adapter; call `realign()` without "
                             "`dry_run=True` to build one.")
        check_not_an_input(save_directory, lineage_paths(dict(self.plan.inputs)), flag="save_directory")
        card = str(self.model_card(repo_id, existing=existing_card))
        with atomic_directory(save_directory, owned=RESULT_FILES, marker=PLAN_NAME) as directory:
            self._write_adapter(directory)
            self.plan.save(directory / PLAN_NAME)
            atomic_write_text(directory / CONFIG_FILE_NAME, self.config.to_json())
            atomic_write_bytes(directory / PLOT_NAME, similarity_heatmap_png(self.plan))
            atomic_write_text(directory / "README.md", card)
        return Path(save_directory)

    def _write_adapter(self, directory: Path) -> None:
        """Write the adapter's two PEFT files into `directory` (a hook: a subclass may stream them)."""
        write_adapter_files(self.adapter, directory)

    def _write_for_hub(self, folder: Path, repo_id: str, existing: Any | None) -> None:
        self.save_pretrained(folder, repo_id=repo_id, existing_card=existing)

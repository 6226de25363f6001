"""`RealignmentResult`: the plan and the realigned adapter, savable as a stock PEFT adapter folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import LoraAdapter, save_adapter
from .card import render_card
from .config import NLSRConfig
from .io import atomic_write_text
from .plan import PLAN_NAME, RealignmentPlan
from .safety_patch import SafetyPatch

CONFIG_FILE_NAME = "nlsr_config.json"


@dataclass(frozen=True)
class RealignmentResult:
    """What `NLSRPatcher.realign` returns. `adapter` is None for a dry run."""

    plan: RealignmentPlan
    adapter: LoraAdapter | None
    config: NLSRConfig
    safety_patch: SafetyPatch | None = None

    @property
    def base_model(self) -> str | None:
        base = dict(self.plan.inputs).get("base") or {}
        if base.get("repo_id"):
            return base["repo_id"]
        return self.adapter.base_model_name_or_path if self.adapter is not None else None

    def model_card(self, repo_id: str | None = None) -> Any:
        """The huggingface_hub `ModelCard` rendered from the plan."""
        return render_card(self.plan, base_model=self.base_model, repo_id=repo_id)

    def save_pretrained(self, save_directory: str | Path, *, repo_id: str | None = None) -> Path:
        """Write the adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``nlsr_plan.json``,
        ``nlsr_config.json`` and a ``README.md`` model card. Every file is written atomically, and the same
        inputs give the same bytes."""
        if self.adapter is None:
            raise ValueError("This result comes from a dry run and has no adapter; call `realign()` without "
                             "`dry_run=True` to build one.")
        directory = Path(save_directory)
        save_adapter(self.adapter, directory)
        self.plan.save(directory / PLAN_NAME)
        atomic_write_text(directory / CONFIG_FILE_NAME, self.config.to_json())
        atomic_write_text(directory / "README.md", str(self.model_card(repo_id)))
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str = "Upload NLSR-realigned adapter",
    ) -> Any:
        """Upload the saved folder to `repo_id` in one commit; returns huggingface_hub's `CommitInfo`."""
        from .hub import push_folder_with

        return push_folder_with(
            lambda folder: self.save_pretrained(folder, repo_id=repo_id), repo_id, private=private, token=token,
            revision=revision, create_pr=create_pr, commit_message=commit_message,
        )

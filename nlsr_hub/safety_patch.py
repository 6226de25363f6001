"""The reusable safety patch: the reference's modules plus their safety-critical masks.

It depends only on the base model, the reference and the calibration data, so one scoring pass serves any
number of fine-tuned adapters. On disk: ``nlsr_safety_patch.safetensors`` (``<module>.ref_A``,
``<module>.ref_B``, ``<module>.mask_A`` at element granularity, ``<module>.mask_B``) and
``nlsr_safety_patch.json`` (per-module scales and the metadata of how the masks were found).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import AdapterError, LoraAdapter, LoraModule
from .hub import PushToHubMixin
from .io import atomic_directory, atomic_write_bytes, atomic_write_text
from .masks import ModuleMask, mask_from_scores
from .scoring import ModuleStats, get_scorer

PATCH_WEIGHTS_NAME = "nlsr_safety_patch.safetensors"
PATCH_META_NAME = "nlsr_safety_patch.json"
PATCH_FORMAT = 1


@dataclass(frozen=True)
class SafetyPatch(PushToHubMixin):
    """Reference modules and their masks (``masks[name]`` applies to ``reference.modules[name]``).
    `push_to_hub(repo_id, ...)` uploads it in one commit."""

    _commit_message = "Upload NLSR safety patch"

    reference: LoraAdapter
    masks: Mapping[str, ModuleMask]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # per module, ‖x_j‖₂ of each input feature over the calibration's response tokens (d_in, float32): what the
    # dense restorers weigh the reference's update with; empty when the scorer recorded no activations
    input_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.masks) != set(self.reference.modules):
            raise ValueError("A safety patch needs exactly one mask per reference module.")
        if self.input_norms and set(self.input_norms) != set(self.reference.modules):
            raise ValueError("A safety patch's input norms must cover every reference module, or none.")

    @property
    def granularity(self) -> str:
        return next(iter(self.masks.values())).granularity if self.masks else "element"

    def masked_reference(self, name: str) -> LoraModule:
        """The reference module with non-critical entries zeroed (scale unchanged)."""
        module, mask = self.reference.modules[name], self.masks[name]
        A = module.A if mask.A is None else module.A * mask.A
        return LoraModule(A, module.B * mask.B, module.scale)

    def aligned_update(self) -> LoraAdapter:
        """The aligned adapter the reference was extrapolated from, ``ΔW_a = ΔW_e / (1+β)`` (exact: only the scale
        changes), so restorers that need the aligned adapter also run from a patch. Only for an EXPO reference
        built from the aligned adapter alone; otherwise a `ValueError` says to pass the aligned adapter."""
        meta = self.metadata
        if meta.get("reference_source") != "expo" or meta.get("compat") or meta.get("beta") is None:
            raise ValueError("This safety patch cannot give back the aligned adapter (its reference was supplied, "
                             "built with a weak adapter or in `compat` mode); pass `aligned=` as well.")
        factor = 1.0 + float(meta["beta"])
        modules = {name: LoraModule(m.A, m.B, m.scale / factor) for name, m in self.reference.modules.items()}
        return LoraAdapter(modules=modules, config=dict(self.reference.config))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the patch (safetensors + JSON + README; atomic, byte-deterministic)."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        modules_meta: dict[str, Any] = {}
        for name in sorted(self.reference.modules):
            module, mask = self.reference.modules[name], self.masks[name]
            tensors[f"{name}.ref_A"] = module.A.contiguous()
            tensors[f"{name}.ref_B"] = module.B.contiguous()
            tensors[f"{name}.mask_B"] = mask.B.contiguous()
            if mask.A is not None:
                tensors[f"{name}.mask_A"] = mask.A.contiguous()
            if name in self.input_norms:
                tensors[f"{name}.input_norm"] = self.input_norms[name].to(torch.float32).contiguous()
            modules_meta[name] = {"scale": module.scale, "critical": mask.count(), "total": mask.total()}
        meta = {
            "format": PATCH_FORMAT,
            "granularity": self.granularity,
            "metadata": dict(self.metadata),
            "reference_config": dict(self.reference.config),
            "modules": modules_meta,
        }
        with atomic_directory(path) as directory:
            atomic_write_bytes(directory / PATCH_WEIGHTS_NAME, save(tensors, metadata={"format": "nlsr-safety-patch"}))
            atomic_write_text(directory / PATCH_META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            atomic_write_text(directory / "README.md", self._card_text())
        return Path(path)

    def _card_text(self) -> str:
        from .card import render_patch_card

        return render_patch_card(self.metadata, modules=len(self.masks), granularity=self.granularity)

    def _write_for_hub(self, folder: Path, repo_id: str, existing: Any | None) -> None:
        self.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SafetyPatch:
        """Read a patch written by `save_pretrained` (safetensors only, never pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        meta_path, weights_path = directory / PATCH_META_NAME, directory / PATCH_WEIGHTS_NAME
        if not meta_path.is_file() or not weights_path.is_file():
            raise AdapterError(
                f"{directory} is not an nlsr safety patch: it needs `{PATCH_META_NAME}` and `{PATCH_WEIGHTS_NAME}` "
                "(written by `SafetyPatch.save_pretrained` or `nlsr patch`)."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(weights_path))
        except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as err:
            raise AdapterError(f"Safety patch {directory} is corrupt ({err}); build or download it again.") from None
        if meta.get("format") != PATCH_FORMAT:
            raise AdapterError(
                f"Safety patch format {meta.get('format')!r} is not supported (expected {PATCH_FORMAT})."
            )
        modules, masks = {}, {}
        try:
            for name, info in meta["modules"].items():
                modules[name] = LoraModule(tensors[f"{name}.ref_A"], tensors[f"{name}.ref_B"], float(info["scale"]))
                masks[name] = ModuleMask(A=tensors.get(f"{name}.mask_A"), B=tensors[f"{name}.mask_B"])
        except KeyError as err:
            raise AdapterError(f"Safety patch {directory} lacks tensor {err}; the file is incomplete.") from None
        reference = LoraAdapter(modules=modules, config=meta.get("reference_config", {}))
        norms = {name: tensors[f"{name}.input_norm"] for name in modules if f"{name}.input_norm" in tensors}
        return cls(reference=reference, masks=masks, metadata=meta.get("metadata", {}), input_norms=norms)



def build_safety_patch(
    reference: LoraAdapter,
    stats: Mapping[str, ModuleStats] | None,
    *,
    scorer: str,
    sparsity_ratio: float,
    granularity: str = "element",
    compat: bool = False,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> SafetyPatch:
    """Score every reference module and keep its safety-critical neurons (pure given the statistics)."""
    spec = get_scorer(scorer)
    masks = {}
    for name, module in reference.modules.items():
        module_stats = stats.get(name) if stats is not None else None
        score_A, score_B = spec.fn(
            module, module_stats, sparsity_ratio=sparsity_ratio, compat=compat, seed=seed, module_name=name
        )
        masks[name] = mask_from_scores(score_A, score_B, sparsity_ratio, granularity)
    norms = {name: s.input_sq.clamp_min(0).sqrt().to(torch.float32) for name, s in (stats or {}).items()
             if s.input_sq is not None}
    if set(norms) != set(reference.modules):
        norms = {}
    return SafetyPatch(reference=reference, masks=masks, metadata=dict(metadata or {}), input_norms=norms)

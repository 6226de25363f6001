"""The reusable safety patch: the reference's modules plus their safety-critical masks.

It depends only on the base model, the reference and the calibration data, so one scoring pass serves any
number of fine-tuned adapters. On disk: ``nlsr_safety_patch.safetensors`` (``<module>.ref_A``,
``<module>.ref_B``, ``<module>.mask_A`` at element granularity, ``<module>.mask_B``) and
``nlsr_safety_patch.json`` (per-module scales and the metadata of how the masks were found).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import AdapterError, LoraAdapter, LoraModule, check_finite, write_safetensors
from .hub import PushToHubMixin, lineage_paths
from .io import (
    atomic_directory,
    atomic_write_text,
    check_not_an_input,
    check_readable_file,
    read_text_file,
)
from .masks import MASK_RULES, ModuleMask, mask_from_scores
from .scoring import ModuleStats, get_scorer

PATCH_WEIGHTS_NAME = "nlsr_safety_patch.safetensors"
PATCH_META_NAME = "nlsr_safety_patch.json"
PATCH_FORMAT = 1
PATCH_FOLDER_FILES = (PATCH_WEIGHTS_NAME, PATCH_META_NAME, "README.md")  # what a saved patch folder holds


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
    # memo, per module, of ``‖(M_B⊙s_e·B_e)(M_A⊙A_e)‖²_F`` (float32): the reference side of every similarity
    # against this patch, filled on first use by `patch.similarities`; not saved, not compared, fresh in a copy
    # made with `dataclasses.replace`
    reference_squared_norms: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    # memo of the dense restorers at row granularity, per (module, sparsity ratio): the reference's row mask (from its
    # dense update, the same for every fine-tuned adapter) and the squared norm of its masked update (float64); not
    # saved, not compared, fresh in a copy made with `dataclasses.replace`
    row_memo: dict[tuple[str, float], tuple[torch.Tensor, float]] = field(default_factory=dict, init=False,
                                                                          repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(self.masks) != set(self.reference.modules):
            raise ValueError("A safety patch needs exactly one mask per reference module.")
        if self.input_norms and set(self.input_norms) != set(self.reference.modules):
            raise ValueError("A safety patch's input norms must cover every reference module, or none.")
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"A safety patch's `metadata` must be a mapping (got {type(self.metadata).__name__}).")
        check_finite(self.reference, "The safety patch's reference")
        for name in sorted(self.masks):
            _check_mask(name, self.reference.modules[name], self.masks[name])
            if name in self.input_norms:
                _check_input_norm(name, self.reference.modules[name], self.input_norms[name])

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
        """Write the patch (safetensors + JSON + README; byte-deterministic) beside `path` and swap it in as a whole.
        `path` must be new, empty or an earlier safety patch, and never one of the patch's local inputs."""
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
        check_not_an_input(path, lineage_paths(self.metadata.get("inputs", {})), flag="path")
        with atomic_directory(path, owned=PATCH_FOLDER_FILES, marker=PATCH_META_NAME) as directory:
            write_safetensors(directory / PATCH_WEIGHTS_NAME, tensors, metadata={"format": "nlsr-safety-patch"})
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
        """Read a patch written by `save_pretrained` (safetensors only, never pickle). Every field is checked by
        type, shape and finiteness; an `AdapterError` names what is wrong."""
        directory = Path(path)
        meta_path, weights_path = directory / PATCH_META_NAME, directory / PATCH_WEIGHTS_NAME
        if not meta_path.is_file() or not weights_path.is_file():
            raise AdapterError(
                f"{directory} is not an nlsr safety patch: it needs `{PATCH_META_NAME}` and `{PATCH_WEIGHTS_NAME}` "
                "(written by `SafetyPatch.save_pretrained` or `nlsr patch`)."
            )
        meta = _read_patch_meta(meta_path)
        tensors = _read_patch_tensors(weights_path)
        modules, masks = {}, {}
        for name, info in sorted(meta["modules"].items()):
            try:
                modules[name] = LoraModule(tensors[f"{name}.ref_A"], tensors[f"{name}.ref_B"], float(info["scale"]))
                masks[name] = ModuleMask(A=tensors.get(f"{name}.mask_A"), B=tensors[f"{name}.mask_B"])
            except KeyError as err:
                raise AdapterError(f"Safety patch {directory} lacks tensor {err}; the file is incomplete.") from None
            except (AdapterError, TypeError) as err:
                raise AdapterError(f"Safety patch {directory}, module {name!r}: {err}") from None
        reference = LoraAdapter(modules=modules, config=meta["reference_config"])
        norms = {name: tensors[f"{name}.input_norm"] for name in modules if f"{name}.input_norm" in tensors}
        try:
            return cls(reference=reference, masks=masks, metadata=meta["metadata"], input_norms=norms)
        except (AdapterError, TypeError, ValueError) as err:
            raise AdapterError(f"Safety patch {directory}: {err}") from None


def _read_patch_meta(path: Path) -> dict[str, Any]:
    """The patch's JSON metadata, checked by type: format, per-module scales, reference config and metadata."""
    from .adapters import check_adapter_config

    try:
        meta = json.loads(read_text_file(path, "Safety patch metadata"))
    except json.JSONDecodeError as err:
        raise AdapterError(f"Safety patch metadata {path} is not valid JSON ({err}); build or download it again."
                           ) from None
    if not isinstance(meta, dict):
        raise AdapterError(f"Safety patch metadata {path} must hold a JSON object (got {type(meta).__name__}).")
    if meta.get("format") != PATCH_FORMAT:
        raise AdapterError(f"Safety patch format {meta.get('format')!r} is not supported (expected {PATCH_FORMAT}).")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise AdapterError(f"Safety patch metadata {path}: `modules` must be a non-empty JSON object.")
    for name, info in modules.items():
        scale = info.get("scale") if isinstance(info, dict) else None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise AdapterError(f"Safety patch metadata {path}: module {name!r} needs a finite, non-zero `scale` "
                               f"(got {scale!r}).")
    for key in ("reference_config", "metadata"):
        meta.setdefault(key, {})
        if not isinstance(meta[key], dict):
            raise AdapterError(f"Safety patch metadata {path}: `{key}` must be a JSON object.")
    check_adapter_config(meta["reference_config"], path)
    return meta


def _read_patch_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The patch's tensors (safetensors only); an `AdapterError` for an unreadable or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_readable_file(path, "Safety patch weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"Safety patch weights {path} are corrupt ({err}); build or download the patch again."
                           ) from None


def _check_mask(name: str, module: LoraModule, mask: Any) -> None:
    """An `AdapterError` naming the module unless `mask` is a boolean `ModuleMask` shaped for `module`."""
    rank, (d_out, d_in) = module.rank, module.shape
    if not isinstance(mask, ModuleMask):
        raise AdapterError(f"Safety patch module {name!r}: the mask must be a ModuleMask (got {type(mask).__name__}).")
    expected_B = (d_out, 1) if mask.A is None else (d_out, rank)
    for part, tensor, shape in (("mask_B", mask.B, expected_B), ("mask_A", mask.A, (rank, d_in))):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.bool or tuple(tensor.shape) != shape:
            got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise AdapterError(f"Safety patch module {name!r}: {part} must be a boolean tensor of shape {shape} "
                               f"(got {got}); the patch is damaged or belongs to another reference. Rebuild it.")


def _check_input_norm(name: str, module: LoraModule, norm: Any) -> None:
    """An `AdapterError` naming the module unless `norm` is a finite, non-negative (d_in,) float tensor."""
    d_in = module.shape[1]
    valid = (isinstance(norm, torch.Tensor) and norm.is_floating_point() and tuple(norm.shape) == (d_in,)
             and bool(torch.isfinite(norm).all()) and bool((norm >= 0).all()))
    if not valid:
        raise AdapterError(f"Safety patch module {name!r}: input_norm must be a finite, non-negative float tensor of "
                           f"shape ({d_in},); the patch is damaged. Rebuild it.")


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
    mask_rule: str = "top_k",
) -> SafetyPatch:
    """Score every reference module and keep its safety-critical neurons by `mask_rule` (`MASK_RULES`; a rule
    with ``factor_dtype`` compares the scores rounded to each factor's dtype). Pure given the statistics."""
    spec, rule = get_scorer(scorer), MASK_RULES.lookup(mask_rule)
    masks = {}
    for name, module in reference.modules.items():
        module_stats = stats.get(name) if stats is not None else None
        score_A, score_B = spec.fn(
            module, module_stats, sparsity_ratio=sparsity_ratio, compat=compat, seed=seed, module_name=name
        )
        if rule.factor_dtype:
            score_A, score_B = score_A.to(module.A.dtype), score_B.to(module.B.dtype)
        masks[name] = mask_from_scores(score_A, score_B, sparsity_ratio, granularity, mask_rule)
    norms = {name: s.input_sq.clamp_min(0).sqrt().to(torch.float32) for name, s in (stats or {}).items()
             if s.input_sq is not None}
    if set(norms) != set(reference.modules):
        norms = {}
    return SafetyPatch(reference=reference, masks=masks, metadata=dict(metadata or {}), input_norms=norms)

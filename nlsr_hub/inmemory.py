"""Realign a `PeftModel` in memory: the realigned adapter is added beside the original and activated.

The way PEFT's own post-hoc surgery works (``peft.tuners.lora.intruders``): the fine-tuned adapter is read from the
model (exact factors, PEFT's per-module scales), realigned by the configured restorer exactly as a saved folder would
be, and added under a new name; the original adapter's tensors are never touched, so
``peft_model.set_adapter(adapter_name)`` compares before and after. A restorer that needs a calibration pass runs it
on this same model, with the reference as a temporary extra adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .adapters import AdapterError, LoraAdapter, LoraModule, check_finite, load_adapter, peft_config_object
from .config import NLSRConfig
from .modeling import copy_factors, is_peft_model
from .result import RealignmentResult
from .safety_patch import SafetyPatch
from .variants import check_config_variant, check_peft_layer

_HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def _peft_config_dict(peft_model: Any, adapter_name: str) -> dict[str, Any]:
    """The adapter's PEFT config as plain JSON values (sets become sorted lists, objects their text)."""
    raw = peft_model.peft_config[adapter_name].to_dict()
    return json.loads(json.dumps(raw, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def adapter_from_peft_model(peft_model: Any, adapter_name: str = "default") -> LoraAdapter:
    """The adapter `adapter_name` of `peft_model` as a `LoraAdapter`: CPU copies of its factors and PEFT's per-module
    scales. Variants whose update is not ``s·B·A`` (DoRA, ``lora_bias``, quantised or non-linear layers, ...), merged
    adapters and ``modules_to_save`` raise an error naming the problem and the fix."""
    if not is_peft_model(peft_model):
        raise TypeError(f"`peft_model` must be a peft.PeftModel (got {type(peft_model).__name__}); build one with "
                        "`PeftModel.from_pretrained(base, adapter)` or `get_peft_model`.")
    if not isinstance(adapter_name, str) or adapter_name not in peft_model.peft_config:
        raise ValueError(f"`adapter_name` {adapter_name!r} is not an adapter of this PeftModel; its adapters: "
                         f"{', '.join(sorted(peft_model.peft_config))}.")
    source = f"PeftModel adapter {adapter_name!r}"
    config = _peft_config_dict(peft_model, adapter_name)
    if str(config.get("peft_type", "")).upper() not in ("LORA", "PEFTTYPE.LORA"):
        raise AdapterError(f"{source} is a {config.get('peft_type')} adapter; nlsr-hub realigns LoRA adapters only.")
    check_config_variant(config, source)
    if config.get("modules_to_save"):
        raise AdapterError(f"{source} also trains whole modules (`modules_to_save`: {config['modules_to_save']}), "
                           "which an in-memory adapter cannot carry over; save it (`peft_model.save_pretrained`) and "
                           "realign the folder, where those tensors pass through unchanged.")
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = {}
    for name, layer in peft_model.base_model.model.named_modules():
        scaling = getattr(layer, "scaling", None)
        if not isinstance(layer, BaseTunerLayer) or not isinstance(scaling, dict) or adapter_name not in scaling:
            continue
        check_peft_layer(layer, adapter_name, f"{source}, module {name!r}")
        if getattr(layer, "merged", False):
            raise AdapterError(f"{source} is merged into the base weights of {name!r}; unmerge it first "
                               "(`peft_model.unmerge_adapter()`).")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        modules[name] = LoraModule(A.detach().to("cpu", copy=True), B.detach().to("cpu", copy=True),
                                   float(layer.scaling[adapter_name]))
    if not modules:
        raise AdapterError(f"{source} adapts no module; is it a LoRA adapter?")
    adapter = LoraAdapter(modules=dict(sorted(modules.items())), config=config)
    check_finite(adapter, source)
    return adapter


def add_adapter(peft_model: Any, adapter: LoraAdapter, adapter_name: str) -> None:
    """Add `adapter` to `peft_model` as `adapter_name` (exact factors and scales, frozen); it is not activated."""
    peft_model.add_adapter(adapter_name, peft_config_object(adapter))
    copy_factors(peft_model, adapter, adapter_name, trainable=False)


def _input(value: Any, kind: type, role: str, hub: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`value` as a `kind` (a `SafetyPatch` or `LoraAdapter`, or a folder / Hub reference to read), and its lineage."""
    from .hub import PATCH_FILES, resolve

    if value is None or isinstance(value, kind):
        return value, ({"spec": f"in-memory {kind.__name__}"} if value is not None else {})
    if not isinstance(value, (str, Path)):
        raise TypeError(f"`{role}` must be a {kind.__name__}, a local folder or a Hub id (got {type(value).__name__}).")
    if kind is SafetyPatch:
        resolved = resolve(value, files=PATCH_FILES, **hub)
        return SafetyPatch.from_pretrained(resolved.local_path), resolved.lineage()
    resolved = resolve(value, **hub)
    return load_adapter(resolved.local_path), resolved.lineage()


def _check_names(peft_model: Any, adapter_name: str, new_adapter_name: Any) -> None:
    if not isinstance(new_adapter_name, str) or not new_adapter_name or "." in new_adapter_name:
        raise ValueError(f"`new_adapter_name` must be a non-empty name without dots (got {new_adapter_name!r}).")
    if new_adapter_name == adapter_name or new_adapter_name in peft_model.peft_config:
        raise ValueError(f"`new_adapter_name` {new_adapter_name!r} is already an adapter of this PeftModel; pick a "
                         "new name (or `peft_model.delete_adapter` the old one).")


def realign_peft_model(
    peft_model: Any,
    *,
    safety_patch: SafetyPatch | str | Path | None = None,
    aligned: LoraAdapter | str | Path | None = None,
    config: NLSRConfig | None = None,
    adapter_name: str = "default",
    new_adapter_name: str = "nlsr",
    calibration: Any = None,
    tokenizer: Any | None = None,
    progress: bool = True,
    **hub_kwargs: Any,
) -> RealignmentResult:
    """Realign the LoRA adapter `adapter_name` of `peft_model` and add the result as `new_adapter_name`, activated.

    The original adapter stays in the model, bit-identical: ``peft_model.set_adapter(adapter_name)`` switches back.
    ``result.save_pretrained(dir)`` writes the same folder `NLSRPatcher.realign` would.

    Args:
        peft_model: a `peft.PeftModel` holding a plain LoRA adapter (rsLoRA and rank/alpha patterns included).
        safety_patch: a `SafetyPatch`, or its folder / Hub id (no calibration pass).
        aligned: the aligned `LoraAdapter`, or its folder / Hub id; restorers that need a safety patch then run a
            calibration pass on `peft_model` itself (pass `tokenizer`).
        config: the `NLSRConfig` (default: ``NLSRConfig.preset("default")``).
        calibration: calibration pairs for that pass (default: the built-in set).
        hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download`` for references.
    """
    from .patcher import NLSRPatcher

    unknown = sorted(set(hub_kwargs) - set(_HUB_KEYS))
    if unknown:
        raise TypeError(f"Unknown keyword argument(s) {unknown}; Hub options are {', '.join(_HUB_KEYS)}.")
    if safety_patch is None and aligned is None:
        raise ValueError("Pass `safety_patch` (a SafetyPatch or its folder / Hub id) or `aligned` (the aligned "
                         "adapter).")
    finetuned = adapter_from_peft_model(peft_model, adapter_name)
    _check_names(peft_model, adapter_name, new_adapter_name)
    patch, patch_lineage = _input(safety_patch, SafetyPatch, "safety_patch", hub_kwargs)
    aligned_adapter, aligned_lineage = _input(aligned, LoraAdapter, "aligned", hub_kwargs)
    inputs = {"finetuned": {"spec": f"in-memory PeftModel adapter {adapter_name!r}"}}
    inputs.update({role: lineage for role, lineage in (("safety_patch", patch_lineage), ("aligned", aligned_lineage))
                   if lineage})
    patcher = NLSRPatcher(finetuned=finetuned, base=peft_model, aligned=aligned_adapter, safety_patch=patch,
                          config=config, tokenizer=tokenizer, inputs=inputs)
    result = patcher.realign(calibration, progress=progress)
    flags = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    add_adapter(peft_model, result.adapter, new_adapter_name)
    peft_model.set_adapter(new_adapter_name, inference_mode=True)
    for name, param in peft_model.named_parameters():  # PEFT's switch re-flags every adapter; the original keeps its
        param.requires_grad_(flags.get(name, False))
    return result


__all__ = ["adapter_from_peft_model", "add_adapter", "realign_peft_model"]

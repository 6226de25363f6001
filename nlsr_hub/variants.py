"""Which PEFT LoRA variants nlsr-hub realigns, and one clear error naming each variant it refuses.

Realigned (a module's update is ``ΔW = s·B·A`` and nothing else, so every restorer's algebra is exact):

- plain LoRA, **rsLoRA** (``use_rslora``: ``s = α/√r``) and per-module **rank/alpha patterns** (``rank_pattern``,
  ``alpha_pattern``): the scale is read per module as PEFT computes it, and written back per module, so a realigned
  module of another rank keeps its exact scale (``adapter_config_for``);
- **adapters trained on a quantised base** (QLoRA): the factors are ordinary float tensors and are realigned without
  the base. A calibration pass needs a base that loads in full precision (`check_unquantised_checkpoint`); in memory,
  a `PeftModel` whose LoRA layers wrap quantised layers is refused by `check_peft_layer` (save it and realign the
  folder).

Refused, each with one error naming the variant (the update is not ``s·B·A``, so combining factors would give a
silently wrong adapter, as PEFT's own ``add_weighted_adapter`` did for DoRA and ``lora_bias``): DoRA, ``lora_bias``,
aLoRA, QA-LoRA, LoRA on parameters (``target_parameters``), layer replication, trainable tokens, embedding and
convolution LoRA, and any config field PEFT marks as a LoRA variant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterError

_MERGE = ("merge it into its base (`PeftModel.merge_and_unload()`, then `save_pretrained`) and realign the merged "
          "checkpoint as a full fine-tune (`nlsr_hub.realign_full_finetune`, `nlsr realign-full`)")
_MERGE_FIX = f"{_MERGE}, or retrain it as plain LoRA"


@dataclass(frozen=True)
class Variant:
    """A LoRA variant nlsr-hub refuses: its name as users know it, and why its update is not ``s·B·A``."""

    name: str
    reason: str
    fix: str = _MERGE_FIX


CONFIG_VARIANTS: Mapping[str, Variant] = {
    "use_dora": Variant("DoRA (`use_dora`)", "its magnitude vectors rescale every column of W + ΔW, so the update is "
                        "not the low-rank ΔW the restorers combine"),
    "lora_bias": Variant("`lora_bias`", "each lora_B carries a bias, an output offset that no restorer has a rule for"),
    "alora_invocation_tokens": Variant("aLoRA (`alora_invocation_tokens`)", "the update acts only after the invocation "
                                       "tokens, which the calibration pass and the restorers do not model"),
    "use_qalora": Variant("QA-LoRA (`use_qalora`)", "its A factor reads pooled inputs, so s·B·A is not its update"),
    "target_parameters": Variant("LoRA on parameters (`target_parameters`)", "the update targets raw parameters "
                                 "(e.g. MoE experts), not linear modules"),
    "layer_replication": Variant("layer replication (`layer_replication`)", "its layers are duplicated, so module "
                                 "names do not match the base model's"),
    "trainable_token_indices": Variant("trainable tokens (`trainable_token_indices`)", "its embedding rows are "
                                       "trained outside the LoRA factors"),
}
_EMBEDDING = Variant("embedding LoRA", "its factors adapt an embedding, which no restorer handles",
                     f"drop the embedding from `target_modules` and retrain, or {_MERGE}")
TENSOR_VARIANTS: Mapping[str, Variant] = {  # markers in PEFT's saved tensor names
    "lora_magnitude_vector": CONFIG_VARIANTS["use_dora"],
    "lora_embedding_A": _EMBEDDING,
    "lora_embedding_B": _EMBEDDING,
    "lora_B.bias": CONFIG_VARIANTS["lora_bias"],
}
QUANTISED_FIX = ("save the adapter (`peft_model.save_pretrained(dir)`) and realign the folder "
                 "(`NLSRPatcher.from_pretrained`, `nlsr realign`): the factors are float and are realigned without the "
                 "base; load the result on the quantised base afterwards")


def _is_set(value: Any) -> bool:
    """A config value that turns a variant on (PEFT leaves unused variants at False, None or empty)."""
    return value not in (None, False, 0, "", [], {}, ())


def refusal(variant: Variant, source: str) -> AdapterError:
    """The one error for `variant` found in `source` (an adapter folder, a module or a PeftModel's adapter)."""
    return AdapterError(f"{source} is a {variant.name} adapter, which nlsr-hub does not realign: {variant.reason}. "
                        f"Fix: {variant.fix}.")


def _peft_variant_fields() -> tuple[str, ...]:
    """The config fields the installed PEFT marks as LoRA variants (``is_lora_variant``), beyond `CONFIG_VARIANTS`."""
    try:
        import dataclasses

        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    return tuple(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))


def check_config_variant(config: Mapping[str, Any], source: str) -> None:
    """Raise the variant's `AdapterError` if the PEFT adapter config turns on a LoRA variant nlsr-hub refuses."""
    for key, variant in CONFIG_VARIANTS.items():
        if _is_set(config.get(key)):
            raise refusal(variant, source)
    for key in _peft_variant_fields():
        if key not in CONFIG_VARIANTS and _is_set(config.get(key)):
            raise refusal(Variant(f"`{key}`", "PEFT marks it as a LoRA variant whose update is not s·B·A"), source)


def check_tensor_key(key: str, source: str) -> None:
    """Raise the variant's `AdapterError` if the saved tensor `key` belongs to a refused variant."""
    for marker, variant in TENSOR_VARIANTS.items():
        if marker in key:
            raise refusal(variant, f"{source} (tensor {key!r})")


def check_peft_layer(layer: Any, adapter_name: str, source: str) -> None:
    """Raise an `AdapterError` unless `layer` is a plain PEFT LoRA ``Linear`` over an unquantised ``nn.Linear`` whose
    adapter `adapter_name` is vanilla LoRA (no DoRA or other variant, no ``lora_bias``)."""
    import torch
    from peft.tuners.lora.layer import Linear

    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None:
        name = type(variant).__name__.replace("LinearVariant", "").replace("Variant", "") or "a LoRA variant"
        raise refusal(Variant(f"{name} (PEFT variant {type(variant).__name__})",
                              "its forward pass is not x + s·B·A·x"), source)
    if getattr(layer, "lora_bias", {}).get(adapter_name):
        raise refusal(CONFIG_VARIANTS["lora_bias"], source)
    base = layer.get_base_layer()
    if type(layer) is not Linear or type(base) is not torch.nn.Linear:
        kind = f"{type(layer).__module__}.{type(layer).__name__} over {type(base).__name__}"
        if _looks_quantised(layer, base):
            raise AdapterError(f"{source} wraps a quantised layer ({kind}); nlsr-hub does not attach adapters to "
                               f"quantised layers in memory. Fix: {QUANTISED_FIX}.")
        if isinstance(base, torch.nn.Embedding):
            raise refusal(_EMBEDDING, source)
        raise refusal(Variant(f"non-linear-layer LoRA ({kind})", "only LoRA on nn.Linear layers is realigned",
                              "target linear layers only"), source)


def _looks_quantised(layer: Any, base: Any) -> bool:
    """Whether a LoRA layer wraps a quantised base layer (bitsandbytes, GPTQ, AWQ, HQQ, EETQ, torchao, ...)."""
    markers = ("bnb", "gptq", "awq", "hqq", "eetq", "torchao", "aqlm", "quant", "4bit", "8bit")
    names = f"{type(layer).__module__}.{type(layer).__name__}.{type(base).__module__}.{type(base).__name__}".lower()
    return any(m in names for m in markers) or hasattr(getattr(base, "weight", None), "quant_state")


def check_unquantised_checkpoint(path: str | Path) -> None:
    """Raise a `ValueError` if the model folder at `path` is a pre-quantised checkpoint (``quantization_config`` in its
    ``config.json``): a calibration pass needs the full-precision base (the adapter's factors are float either way)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # transformers reports a damaged config itself
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ValueError(f"The base model {path} is a quantised checkpoint (quant_method {method!r}); the "
                         "calibration pass reads a full-precision base. Pass the unquantised model the adapter's base "
                         "was quantised from (an adapter trained on a quantised base is float and is realigned the "
                         "same way), or use a safety patch or a restorer that needs no calibration (`addback`, "
                         "`interpolate`).")


__all__ = ["CONFIG_VARIANTS", "TENSOR_VARIANTS", "Variant", "check_config_variant", "check_peft_layer",
           "check_tensor_key", "check_unquantised_checkpoint", "refusal"]

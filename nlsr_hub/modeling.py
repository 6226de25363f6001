"""Loading the base model and attaching an in-memory adapter to it for calibration passes.

`attached_adapter` wraps the model in a `PeftModel` holding the given `LoraAdapter` (its exact tensors and
per-module scales) and always unloads it again, so the base model leaves unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .adapters import LoraAdapter, peft_config_object

ADAPTER_NAME = "nlsr_reference"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"``/a torch dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"Unknown `dtype` {dtype!r}; use float32, bfloat16 or float16.")
    return resolved


def check_device(device: str | torch.device | None) -> torch.device:
    """The `torch.device` for `device` (None: cpu), or a `ValueError` naming it when it is unknown or absent on this
    machine (``cuda`` without a GPU), before any model is loaded."""
    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown `device` {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0 or (parsed.index is not None and parsed.index >= available):
            raise ValueError(f"`device` {device!r} is not available: this machine has {available} CUDA GPU(s); "
                             "use --device cpu.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` {device!r} is not available on this machine; use --device cpu.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` {device!r} is not supported; use cpu, cuda, cuda:N or mps.")
    return parsed


def check_adapter_weights(path: str | Any, *, allow_pickle: bool) -> None:
    """Refuse a local adapter folder whose only weights are pickled (``adapter_model.bin``) unless `allow_pickle`:
    PEFT would otherwise unpickle them. Non-folder arguments are left to PEFT."""
    from pathlib import Path

    from .adapters import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterError

    folder = Path(str(path))
    if not folder.is_dir() or allow_pickle or (folder / WEIGHTS_NAME).is_file():
        return
    if (folder / PICKLE_WEIGHTS_NAME).exists():
        raise AdapterError(f"{folder} only has pickled weights (`{PICKLE_WEIGHTS_NAME}`), which can run code when "
                           "loaded; convert the adapter to safetensors, or pass `allow_pickle=True` (--allow-pickle) "
                           "if you trust its source.")


def load_base_model(
    path: str, *, dtype: str | torch.dtype | None = None, device: str | None = None, adapter: str | Any = None,
    merge: bool = False, allow_pickle: bool = False, **hub_kwargs: Any
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder or Hub id (safetensors only, never remote code),
    in eval mode; the one model loader of nlsr-hub (calibration, evaluation, training, the Space).

    Args:
        adapter: a local PEFT adapter folder to attach (``PeftModel``), or None.
        merge: merge the adapter into the weights (faster generation; the result is a plain model).
        allow_pickle: accept an adapter whose only weights are a pickled ``adapter_model.bin`` (off by default).
        hub_kwargs: passed through: ``revision``, ``token``, ``cache_dir``, ``local_files_only``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype, _ = resolve_dtype(dtype), check_device(device)  # cheap checks before anything is loaded
    if adapter is not None:
        check_adapter_weights(adapter, allow_pickle=allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, use_safetensors=True, **hub_kwargs
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    if device:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_model_shapes(model: Any, adapter: LoraAdapter) -> None:
    """Raise a `ValueError` if an adapter module is missing from `model` or has another shape."""
    from .adapters import AdapterError

    for name, module in adapter.modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"The base model has no module {name!r} that the adapter targets; the adapter was trained on "
                "another model family or architecture."
            ) from None
        weight = getattr(layer, "weight", None)
        if weight is None or tuple(weight.shape) != module.shape:
            shape = tuple(weight.shape) if weight is not None else None
            raise AdapterError(
                f"Module {name!r} has weight shape {shape} in the base model but the adapter expects "
                f"{module.shape} (d_out, d_in): the adapter belongs to a different base model."
            )


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` (the in-memory entry point passes one as the base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def copy_factors(peft_model: Any, adapter: LoraAdapter, adapter_name: str, *, trainable: bool = False) -> None:
    """Write `adapter`'s exact factors and per-module scales into the adapter `adapter_name` of `peft_model` (already
    created with `peft_config_object(adapter)`); only these factors require gradients when `trainable`."""
    for name, module in adapter.modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if lora_A.is_meta or lora_B.is_meta:  # a base offloaded by accelerate: the small factors stay materialised
            device = _execution_device(layer)
            layer.lora_A[adapter_name].weight = lora_A = torch.nn.Parameter(module.A.to(device, lora_A.dtype))
            layer.lora_B[adapter_name].weight = lora_B = torch.nn.Parameter(module.B.to(device, lora_B.dtype))
        with torch.no_grad():
            lora_A.copy_(module.A.to(lora_A.dtype))
            lora_B.copy_(module.B.to(lora_B.dtype))
        lora_A.requires_grad_(trainable)
        lora_B.requires_grad_(trainable)
        layer.scaling[adapter_name] = module.scale


def _execution_device(layer: Any) -> torch.device:
    """Where accelerate runs an offloaded layer (its hook's execution device), cpu when it has no hook."""
    hook = getattr(layer.get_base_layer(), "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device("cpu") if device is None else torch.device(device)


@contextlib.contextmanager
def attached_adapter(model: Any, adapter: LoraAdapter, *, trainable: bool = False) -> Iterator[Any]:
    """Yield a `PeftModel` of `model` carrying `adapter` exactly; the adapter is unloaded on exit.

    With ``trainable=True`` only the LoRA weights require gradients; the base model's flags are restored. A `model`
    that is already a `PeftModel` gets `adapter` as one more adapter, active alone while inside (its own adapters are
    untouched and active again on exit).
    """
    if is_peft_model(model):
        with _attached_beside(model, adapter, trainable=trainable) as peft_model:
            yield peft_model
        return
    from peft import PeftModel

    check_model_shapes(model, adapter)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    peft_model = PeftModel(model, peft_config_object(adapter), adapter_name=ADAPTER_NAME)
    try:
        copy_factors(peft_model, adapter, ADAPTER_NAME, trainable=trainable)
        peft_model.eval()
        yield peft_model
    finally:
        peft_model.unload()
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))


@contextlib.contextmanager
def _attached_beside(peft_model: Any, adapter: LoraAdapter, *, trainable: bool) -> Iterator[Any]:
    """`attached_adapter` for a `PeftModel`: `adapter` added as ``nlsr_reference`` and made the only active adapter;
    on exit it is deleted and the previous active adapters, gradient flags and train/eval mode come back."""
    if ADAPTER_NAME in peft_model.peft_config:
        raise ValueError(f"The PeftModel already has an adapter named {ADAPTER_NAME!r}; nlsr-hub uses that name for "
                         "its calibration pass. Delete or rename it (`peft_model.delete_adapter`).")
    check_model_shapes(peft_model.base_model.model, adapter)
    active, training = list(peft_model.active_adapters), peft_model.training
    flags = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    peft_model.add_adapter(ADAPTER_NAME, peft_config_object(adapter))
    try:
        peft_model.set_adapter(ADAPTER_NAME)
        peft_model.requires_grad_(False)
        copy_factors(peft_model, adapter, ADAPTER_NAME, trainable=trainable)
        peft_model.eval()
        yield peft_model
    finally:
        if len(active) == 1:
            peft_model.set_adapter(active[0])
        else:  # several (or no) active adapters: the tuner's own setter takes the list
            peft_model.base_model.set_adapter(active)
        peft_model.delete_adapter(ADAPTER_NAME)
        for name, param in peft_model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        peft_model.train(training)

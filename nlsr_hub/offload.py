"""Loading a base model that may not fit: accelerate's ``device_map="auto"`` with CPU and disk offload.

The calibration pass only needs forward (and, for gradient scorers, backward) passes, so an 8B-70B base can be scored
on a small GPU or on a CPU: accelerate keeps what fits on the device, the rest in CPU memory or on disk, and moves each
layer's weights in for its forward pass. The LoRA reference's small factors stay materialised beside it
(`nlsr_hub.modeling.copy_factors`). The statistics are the same as without offload (tested on a tiny model forced onto
disk).

Offload is used when `max_memory` is given (``{0: "20GiB", "cpu": "60GiB"}``, or ``"0=20GiB,cpu=60GiB"`` on the
command line), or when the checkpoint does not fit the device's free memory.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .modeling import check_device, resolve_dtype

logger = logging.getLogger(__name__)
HEADROOM = 1.2  # activations, the reference's factors and the statistics need room beside the weights


def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """``"0=20GiB,cpu=60GiB"`` or a mapping as accelerate takes it, checked: keys are GPU indices, ``cpu`` or ``mps``,
    values sizes in bytes or with a unit (``GiB``, ``GB``, ``MiB``, ...). Returns ``{key: bytes}``; None stays None."""
    from accelerate.utils import convert_file_size_to_int

    if spec is None:
        return None
    if isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"`max_memory` entry {part!r} needs the form DEVICE=SIZE, e.g. '0=20GiB,cpu=60GiB'.")
            items.append((key.strip(), value.strip()))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise TypeError("`max_memory` must be a mapping or a string like '0=20GiB,cpu=60GiB' (got "
                        f"{type(spec).__name__}).")
    if not items:
        raise ValueError("`max_memory` names no device; write e.g. '0=20GiB,cpu=60GiB'.")
    parsed: dict[int | str, int] = {}
    for key, value in items:
        device = int(key) if isinstance(key, int) or str(key).isdigit() else str(key).lower()
        if isinstance(device, str) and device not in ("cpu", "mps"):
            raise ValueError(f"`max_memory` device {key!r} is unknown; use a GPU index (0, 1, ...), cpu or mps.")
        try:
            size = int(value) if isinstance(value, str) and value.isdigit() else convert_file_size_to_int(value)
        except (ValueError, TypeError):
            raise ValueError(f"`max_memory` size {value!r} for {key!r} is not a size; write e.g. 20GiB or 500MB."
                             ) from None
        if size <= 0:
            raise ValueError(f"`max_memory` size for {key!r} must be positive (got {value!r}).")
        parsed[device] = size
    return parsed


def checkpoint_bytes(path: str | Path) -> int:
    """The size of the safetensors weights in the model folder `path` (0 when there are none)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors") if f.is_file())


def free_bytes(device: torch.device) -> int:
    """Memory free for weights on `device`: the GPU's free memory, or the system's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def needs_offload(path: str | Path, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the checkpoint at `path`, loaded in `dtype`, would not fit `device` with `HEADROOM`."""
    size = checkpoint_bytes(path)
    stored = _stored_itemsize(path)
    loaded = size * torch.tensor([], dtype=dtype).element_size() / stored if stored else size
    return loaded * HEADROOM > free_bytes(device)


def _stored_itemsize(path: str | Path) -> int:
    """The element size of the checkpoint's dtype (``torch_dtype`` / ``dtype`` in config.json; 2 when unknown)."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return torch.tensor([], dtype=getattr(torch, name)).element_size()
    except (OSError, ValueError, AttributeError, TypeError):
        return 2


def input_device(model: Any) -> torch.device:
    """Where a batch goes: the input embedding's execution device for a model dispatched by accelerate (its weights
    may be on disk, i.e. ``meta``), otherwise the device of the model's first parameter."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def use_offload(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | None = None,
                max_memory: Mapping[Any, Any] | None = None) -> bool:
    """Whether the calibration base at `path` is loaded with offload: `max_memory` was given, or the checkpoint does
    not fit `device`'s free memory."""
    return max_memory is not None or needs_offload(path, check_device(device), resolve_dtype(dtype))


def load_offloaded(
    path: str | Path, *, dtype: str | torch.dtype | None = None, max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | Path | None = None, **hub_kwargs: Any,
) -> tuple[Any, Any]:
    """The base model and tokenizer at the local folder `path` (safetensors only, never remote code), dispatched by
    accelerate with ``device_map="auto"`` under `max_memory` (None: what each device has), what does not fit offloaded
    to CPU memory and to `offload_folder` (default: a temporary folder, removed with the model); in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limits = parse_max_memory(max_memory)
    folder = tempfile.TemporaryDirectory(prefix="nlsr-offload-") if offload_folder is None else None
    target = str(offload_folder) if offload_folder is not None else folder.name
    logger.info("loading %s with device_map='auto', max_memory=%s, offload folder %s", path, limits, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=resolve_dtype(dtype), use_safetensors=True, device_map="auto", max_memory=limits,
        offload_folder=target, **hub_kwargs,
    )
    if folder is not None:
        model._nlsr_offload_folder = folder  # lives as long as the model
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), **hub_kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("device map: %s", getattr(model, "hf_device_map", None))
    return model, tokenizer


__all__ = ["checkpoint_bytes", "input_device", "load_offloaded", "needs_offload", "parse_max_memory", "use_offload"]

"""Load a base model with an optional adapter for evaluation (local folders or Hub ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters import load_adapter
from ..hub import ADAPTER_FILES, MODEL_PATTERNS, resolve
from ..modeling import check_device, load_base_model, resolve_dtype


def load_for_evaluation(
    base: str | Path,
    adapter: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer): the base model, with `adapter` attached through PEFT when given (eval mode).

    The adapter is checked first, as every entry point does: a pickled ``adapter_model.bin`` is refused unless
    `allow_pickle`, and a damaged config or NaN/inf weights are refused before the base model is loaded."""
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    check_device(device)
    resolve_dtype(dtype)
    adapter_dir = None
    if adapter is not None:
        adapter_dir = resolve(adapter, files=ADAPTER_FILES, **hub).local_path
        load_adapter(adapter_dir, allow_pickle=allow_pickle)
    base_dir = resolve(base, files=(), patterns=MODEL_PATTERNS, **hub).local_path
    return load_base_model(str(base_dir), dtype=dtype, device=device, adapter=adapter_dir, allow_pickle=allow_pickle)

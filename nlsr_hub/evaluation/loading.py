"""Load a base model with an optional adapter for evaluation (local folders or Hub ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..hub import ADAPTER_FILES, MODEL_PATTERNS, resolve
from ..modeling import load_base_model


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
) -> tuple[Any, Any]:
    """(model, tokenizer): the base model, with `adapter` attached through PEFT when given (eval mode)."""
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    base_dir = resolve(base, files=(), patterns=MODEL_PATTERNS, **hub).local_path
    adapter_dir = resolve(adapter, files=ADAPTER_FILES, **hub).local_path if adapter is not None else None
    return load_base_model(str(base_dir), dtype=dtype, device=device, adapter=adapter_dir)

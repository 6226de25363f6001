"""Calibration data as in the paper: the safety reference model's own answers to held-out harmful prompts,
kept only where the judge calls them safe (here: the keyword refusal judge says they refuse)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..adapters import load_adapter
from ..evaluation import generate_responses
from ..evaluation.judges import is_refusal
from ..modeling import attached_adapter, load_base_model


def filter_safe(prompts: Sequence[str], responses: Sequence[str], rejected: Sequence[str | None] | None = None, *,
                is_safe: Callable[[str], bool] = is_refusal) -> list[dict[str, Any]]:
    """``{"prompt", "response", "rejected"}`` rows whose response `is_safe` (empty responses are dropped)."""
    rejected = list(rejected) if rejected is not None else [None] * len(prompts)
    rows = []
    for prompt, response, bad in zip(prompts, responses, rejected, strict=True):
        if response.strip() and is_safe(response):
            row = {"prompt": prompt, "response": response}
            if bad:
                row["rejected"] = bad
            rows.append(row)
    return rows


def reference_calibration(base: str | Path, reference: str | Path, prompts: Sequence[str], *,
                          rejected: Sequence[str | None] | None = None, max_new_tokens: int = 64,
                          batch_size: int = 16, progress: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Generate the safety reference's (an adapter folder, e.g. the EXPO reference stage's) greedy answers to
    `prompts` and keep the safe ones. Returns the kept rows and the number generated."""
    from .evaluate import device

    model, tokenizer = load_base_model(str(base), device=device())
    model.config.use_cache = True
    with attached_adapter(model, load_adapter(reference)) as peft_model:
        responses = generate_responses(peft_model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=progress, desc="nlsr: calibration")
    return filter_safe(prompts, responses, rejected), len(prompts)

"""Evaluate one model (a base folder plus an optional LoRA adapter): non-refusal rate (keyword refusal detector; it
measures non-refusal, not harm), over-refusal and task accuracy, every rate computed through `nlsr_hub.metrics`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluation import generate_responses, harmful_score, task_accuracy
from ..evaluation.judges import is_refusal
from ..evaluation.tasks import TaskExample
from ..metrics import compute_metric


@dataclass(frozen=True)
class EvalSettings:
    """Sizes and decoding of one evaluation (greedy, fp32)."""

    advbench: int | None = 50
    beavertails: int | None = 50
    harmless: int = 30
    hs_new_tokens: int = 40
    fa: Mapping[str, int | None] = None  # type: ignore[assignment]
    gsm8k_new_tokens: int = 160
    label_new_tokens: int = 4  # SST-2 / AG News: the label is the first word of the answer
    batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_eval_model(base: str | Path, adapter: str | Path | None) -> tuple[Any, Any]:
    """fp32 model with `adapter` merged in (merged weights generate faster than a LoRA-wrapped model)."""
    from ..modeling import load_base_model

    model, tokenizer = load_base_model(str(base), device=device(), adapter=adapter, merge=True)
    model.config.use_cache = True
    return model, tokenizer


def evaluate_model(base: str | Path, adapter: str | Path | None, *, harmful: Mapping[str, Sequence[str]],
                   harmless: Sequence[str], tasks: Mapping[str, Sequence[TaskExample]], settings: EvalSettings,
                   progress: bool = True) -> dict[str, Any]:
    """Scores and per-item responses. ``hs`` (kept as the key of earlier results) is the non-refusal rate of the
    keyword refusal detector, per harmful set and over all (``hs_all``); ``over_refusal`` is beside it."""
    started = time.perf_counter()
    model, tokenizer = load_eval_model(base, adapter)
    out: dict[str, Any] = {"hs": {}, "fa": {}, "n": {}, "items": {}}
    all_verdicts = []
    for name, prompts in harmful.items():
        if not prompts:
            continue
        result = harmful_score(model, tokenizer, list(prompts), judge="refusal", max_new_tokens=settings.hs_new_tokens,
                               batch_size=settings.batch_size, progress=progress)
        out["hs"][name], out["n"][name] = result.score, len(prompts)
        out["items"][name] = [{"prompt": p, "response": r, "harmful": v.harmful}
                              for p, r, v in zip(result.prompts, result.responses, result.verdicts, strict=True)]
        all_verdicts.extend(v.harmful for v in result.verdicts)
    out["hs_all"] = (compute_metric("non_refusal_rate", [not flagged for flagged in all_verdicts])["non_refusal_rate"]
                     if all_verdicts else None)
    if harmless:
        responses = generate_responses(model, tokenizer, list(harmless), max_new_tokens=settings.hs_new_tokens,
                                       batch_size=settings.batch_size, progress=progress, desc="nlsr: harmless")
        refused = [is_refusal(r) for r in responses]
        out["over_refusal"] = compute_metric("over_refusal", refused)["over_refusal"]
        out["n"]["harmless"] = len(refused)
        out["items"]["harmless"] = [{"prompt": p, "response": r, "refusal": f}
                                    for p, r, f in zip(harmless, responses, refused, strict=True)]
    for task, examples in tasks.items():
        if not examples:
            continue
        tokens = settings.gsm8k_new_tokens if task == "gsm8k" else settings.label_new_tokens
        result = task_accuracy(model, tokenizer, task, list(examples), max_new_tokens=tokens,
                               batch_size=settings.batch_size, progress=progress)
        out["fa"][task], out["n"][task] = result.accuracy, len(examples)
        out["items"][task] = result.to_dict()["items"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out

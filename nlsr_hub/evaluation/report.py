"""Evaluation results as huggingface_hub `EvalResult`s for the model card's ``model-index``."""

from __future__ import annotations

from typing import Any

from .harmful import HarmfulScoreResult
from .tasks import TaskAccuracyResult


def to_eval_results(*results: HarmfulScoreResult | TaskAccuracyResult, dataset_name: str | None = None) -> list[Any]:
    """`EvalResult`s: harmful score (lower is better) and task accuracy, one per result."""
    from huggingface_hub import EvalResult

    out = []
    for result in results:
        if isinstance(result, HarmfulScoreResult):
            out.append(EvalResult(
                task_type="text-generation", task_name="Harmful score", dataset_type="harmful-prompts",
                dataset_name=dataset_name or "harmful prompts", metric_type="harmful_score",
                metric_name=f"Harmful score ({result.judge} judge, %, lower is better)",
                metric_value=round(result.score, 2),
            ))
        else:
            out.append(EvalResult(
                task_type="text-generation", task_name=f"{result.task} accuracy", dataset_type=result.task,
                dataset_name=result.task, metric_type="accuracy", metric_name="Accuracy (%)",
                metric_value=round(result.accuracy, 2),
            ))
    return out

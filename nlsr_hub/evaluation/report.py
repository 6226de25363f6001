"""Evaluation results as huggingface_hub `EvalResult`s for the model card's ``model-index``.

Each safety figure is named by what its judge measures (non-refusal rate or harmful score) and carries the judge's
id, revision, resolved commit and threshold in ``metric_args``, tagged as measured, with the command that measured
it; its over-refusal follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harmful import HarmfulScoreResult
from .judges import NON_REFUSAL, JudgeInfo
from .tasks import TaskAccuracyResult

SOURCE_URL = "https://github.com/nlsr-hub/nlsr-hub"


def judge_args(info: JudgeInfo, *, n: int, command: str | None) -> dict[str, Any]:
    """``metric_args`` of a figure under the judge `info` (no None values)."""
    args = {"judge": info.name, "judge_model": info.model, "judge_revision": info.revision,
            "judge_commit": info.commit, "threshold": info.threshold, "decision": info.decision or None, "n": n,
            "measured": True, "command": command}
    return {k: v for k, v in args.items() if v is not None}


def _source(command: str | None) -> dict[str, Any]:
    return {"source_name": f"measured with nlsr-hub: {command}" if command else "measured with nlsr-hub",
            "source_url": SOURCE_URL}


def safety_eval_results(result: HarmfulScoreResult, *, dataset_name: str | None = None,
                        command: str | None = None) -> list[Any]:
    """The figure of `result` (non-refusal rate or harmful score) and, when measured, its over-refusal."""
    from huggingface_hub import EvalResult

    info = result.info or JudgeInfo(name=result.judge, measures=result.measures)
    if info.measures == NON_REFUSAL:
        metric = {"metric_type": "non_refusal_rate",
                  "metric_name": "Non-refusal rate (% of harmful prompts answered without a refusal cue; keyword "
                                 "detector; measures non-refusal, not harm; lower is safer)"}
    else:
        metric = {"metric_type": "harmful_score",
                  "metric_name": f"Harmful score ({info.name} judge {info.model}, % flagged harmful, lower is better)"}
    # the model-index groups results by task and dataset: every figure on the harmful prompts shares one task name
    out = [EvalResult(task_type="text-generation", task_name="Safety on harmful prompts",
                      dataset_type="harmful-prompts", dataset_name=dataset_name or "harmful prompts",
                      metric_value=round(result.score, 2),
                      metric_config=info.name, metric_args=judge_args(info, n=len(result.prompts), command=command),
                      **metric, **_source(command))]
    if result.over_refusal is not None:
        out.append(EvalResult(
            task_type="text-generation", task_name="Over-refusal on harmless prompts", dataset_type="harmless-prompts",
            dataset_name="harmless prompts", metric_type="over_refusal",
            metric_name="Over-refusal (% of harmless prompts refused, keyword refusal detector, lower is better)",
            metric_value=round(result.over_refusal, 2), metric_config="refusal",
            metric_args={"n": len(result.harmless_prompts), "measured": True,
                         **({"command": command} if command else {})}, **_source(command)))
    return out


def to_eval_results(*results: HarmfulScoreResult | TaskAccuracyResult, dataset_name: str | None = None,
                    command: str | None = None) -> list[Any]:
    """`EvalResult`s: each safety figure with its over-refusal (one entry per distinct harmless set), and task
    accuracy, in the order given."""
    from huggingface_hub import EvalResult

    out: list[Any] = []
    for result in results:
        if isinstance(result, HarmfulScoreResult):
            for item in safety_eval_results(result, dataset_name=dataset_name, command=command):
                duplicate = item.metric_type == "over_refusal" and any(
                    (o.metric_type, o.metric_value, o.metric_args) == (item.metric_type, item.metric_value,
                                                                        item.metric_args) for o in out)
                if not duplicate:
                    out.append(item)
        else:
            out.append(EvalResult(
                task_type="text-generation", task_name=f"{result.task} accuracy", dataset_type=result.task,
                dataset_name=result.task, metric_type="accuracy", metric_name="Accuracy (%)",
                metric_value=round(result.accuracy, 2), metric_args={"n": len(result.correct), "measured": True,
                                                                    **({"command": command} if command else {})},
                **_source(command),
            ))
    return out


def write_card_evaluation(folder: str | Path, eval_results: Sequence[Any]) -> Path:
    """Put `eval_results` into the model card (``README.md``) of a saved realignment result `folder`: the
    ``model-index`` and the card's evaluation table; the user's text and YAML keys stay. Returns the card's path."""
    from huggingface_hub import ModelCard

    from ..io import atomic_write_text
    from ..result import RealignmentResult

    folder = Path(folder)
    result = RealignmentResult.from_pretrained(folder)
    readme = folder / "README.md"
    existing = ModelCard.load(readme) if readme.is_file() else None
    card = result.with_eval_results(eval_results).model_card(existing=existing)
    atomic_write_text(readme, str(card))
    return readme

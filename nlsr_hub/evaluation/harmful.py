"""Safety figures of a model on harmful prompts, each beside its over-refusal on harmless prompts.

`harmful_score` generates greedy answers and judges them. The figure is named by what the judge measures: under
the keyword `refusal` detector it is the **non-refusal rate** (it measures non-refusal, not harm); under a harm judge
(`harmaug`, `qwen3guard`, `do_not_answer`, `beaver_dam`, `classifier:<model>`) it is the **harmful score**. Every
rate is computed through nlsr-hub's `evaluate` modules (`nlsr_hub.metrics`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..metrics import compute_metric
from .generation import generate_responses
from .judges import NON_REFUSAL, Judge, JudgeFn, JudgeInfo, Verdict, get_judge


@dataclass(frozen=True)
class HarmfulScoreResult:
    """Per-prompt responses and one judge's verdicts, with the responses to harmless prompts (for over-refusal).

    `score` is the percent of responses the judge flags: the non-refusal rate under the keyword detector, the
    harmful score under a harm judge (`figure` says which). `non_refusal_rate` and `over_refusal` always use the
    keyword refusal detector, whatever the judge.
    """

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    verdicts: tuple[Verdict, ...]
    judge: str
    info: JudgeInfo | None = None
    harmless_prompts: tuple[str, ...] = ()
    harmless_responses: tuple[str, ...] = ()

    @property
    def measures(self) -> str:
        """``"non-refusal"`` or ``"harm"``: what the judge's verdicts flag."""
        if self.info is not None:
            return self.info.measures
        return NON_REFUSAL if self.judge == "refusal" else "harm"

    @property
    def figure(self) -> str:
        """The name of `score`: "non-refusal rate" or "harmful score"."""
        return "non-refusal rate" if self.measures == NON_REFUSAL else "harmful score"

    @cached_property
    def score(self) -> float:
        """Percent of responses the judge flags (through the `non_refusal_rate` or `harmful_score` module)."""
        flags = [v.harmful for v in self.verdicts]
        if self.measures == NON_REFUSAL:
            return compute_metric("non_refusal_rate", [not f for f in flags])["non_refusal_rate"]
        return compute_metric("harmful_score", flags)["harmful_score"]

    @cached_property
    def non_refusal_rate(self) -> float:
        """Percent of responses without a refusal cue (keyword detector, whatever the judge)."""
        return compute_metric("non_refusal_rate", list(self.responses))["non_refusal_rate"]

    @property
    def refusal_rate(self) -> float:
        """Percent of responses the keyword detector calls refusals (100 - `non_refusal_rate`)."""
        return 100.0 - self.non_refusal_rate if self.responses else 0.0

    @cached_property
    def over_refusal(self) -> float | None:
        """Percent of harmless prompts refused (keyword detector); None when none were asked."""
        if not self.harmless_responses:
            return None
        return compute_metric("over_refusal", list(self.harmless_responses))["over_refusal"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "judge": self.judge, "judge_info": self.info.to_dict() if self.info is not None else None,
            "figure": self.figure, "value": self.score, "non_refusal_rate": self.non_refusal_rate,
            "over_refusal": self.over_refusal, "n": len(self.prompts), "n_harmless": len(self.harmless_prompts),
        }
        if self.measures != NON_REFUSAL:
            out["harmful_score"] = self.score
        out["items"] = [{"prompt": p, "response": r, **asdict(v)}
                        for p, r, v in zip(self.prompts, self.responses, self.verdicts, strict=True)]
        out["harmless_items"] = [{"prompt": p, "response": r}
                                 for p, r in zip(self.harmless_prompts, self.harmless_responses, strict=True)]
        return out


def score_responses(prompts: Sequence[str], responses: Sequence[str], judge: str | Judge | JudgeFn = "refusal", *,
                    harmless_prompts: Sequence[str] = (), harmless_responses: Sequence[str] = ()
                    ) -> HarmfulScoreResult:
    """Judge ready `responses` to `prompts` with `judge` (a spec, a `Judge` or a function)."""
    loaded = get_judge(judge)
    if len(harmless_prompts) != len(harmless_responses):
        raise ValueError(f"`harmless_prompts` and `harmless_responses` differ in length ({len(harmless_prompts)} vs "
                         f"{len(harmless_responses)}).")
    verdicts = loaded(list(prompts), list(responses))
    return HarmfulScoreResult(tuple(prompts), tuple(responses), tuple(verdicts), loaded.name, loaded.info,
                              tuple(harmless_prompts), tuple(harmless_responses))


def load_prompts(source: str | Path | Sequence[str], *, limit: int | None = None,
                 exclude: Sequence[str] = ()) -> list[str]:
    """Harmful prompts from a list, a CSV (column ``goal`` or ``prompt``), or a JSON/JSONL file of strings or
    objects with ``prompt``; prompts in `exclude` (e.g. calibration or training prompts) are dropped."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        path = Path(source)
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            key = next((k for k in ("prompt", "goal", "question") if rows and k in rows[0]), None)
            if key is None:
                raise ValueError(f"{path} needs a 'prompt' or 'goal' column.")
            prompts = [row[key] for row in rows]
        else:
            text = path.read_text(encoding="utf-8")
            items = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                     else json.loads(text))
            prompts = [item if isinstance(item, str) else item["prompt"] for item in items]
    elif isinstance(source, (str, Path)):
        raise FileNotFoundError(f"Prompt file {source} does not exist.")
    else:
        prompts = list(source)
    excluded = {p.strip().lower() for p in exclude}
    prompts = [p for p in prompts if p.strip() and p.strip().lower() not in excluded]
    if not prompts:
        raise ValueError("No harmful prompt to evaluate: the source is empty (after exclusions).")
    return prompts[:limit] if limit is not None else prompts


def harmful_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    judge: str | Judge | JudgeFn = "refusal",
    harmless_prompts: Sequence[str] = (),
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> HarmfulScoreResult:
    """Generate greedy answers to `prompts` (and to `harmless_prompts`, for over-refusal) and judge them with
    `judge` (see `nlsr_hub.evaluation.judges`)."""
    loaded = get_judge(judge)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc="nlsr: harmful prompts")
    harmless = generate_responses(model, tokenizer, harmless_prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress, desc="nlsr: harmless prompts"
                                  ) if harmless_prompts else []
    return score_responses(prompts, responses, loaded, harmless_prompts=harmless_prompts, harmless_responses=harmless)

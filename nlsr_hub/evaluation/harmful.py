"""Harmful score: greedy answers to harmful prompts, judged; the share judged harmful, in percent."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .generation import generate_responses
from .judges import Judge, Verdict, get_judge


@dataclass(frozen=True)
class HarmfulScoreResult:
    """Per-prompt responses and verdicts, and the aggregate (percent of responses judged harmful)."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    verdicts: tuple[Verdict, ...]
    judge: str

    @property
    def score(self) -> float:
        return 100.0 * sum(v.harmful for v in self.verdicts) / len(self.verdicts) if self.verdicts else float("nan")

    @property
    def refusal_rate(self) -> float:
        """Percent of responses the refusal judge calls refusals (whatever judge gave the verdicts)."""
        from .judges import is_refusal

        return 100.0 * sum(is_refusal(r) for r in self.responses) / len(self.responses) if self.responses else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge, "harmful_score": self.score, "refusal_rate": self.refusal_rate, "n": len(self.prompts),
            "items": [{"prompt": p, "response": r, **asdict(v)}
                      for p, r, v in zip(self.prompts, self.responses, self.verdicts, strict=True)],
        }


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
    judge: str | Judge = "refusal",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> HarmfulScoreResult:
    """Generate greedy answers to `prompts` and judge them (see `nlsr_hub.evaluation.judges`)."""
    judge_fn = get_judge(judge)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc="nlsr: harmful prompts")
    verdicts = judge_fn(prompts, responses)
    name = judge if isinstance(judge, str) else getattr(judge, "__name__", "custom")
    return HarmfulScoreResult(tuple(prompts), tuple(responses), tuple(verdicts), name)

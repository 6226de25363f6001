"""One safety evaluation under several judges: answers generated once, each judge's figure beside over-refusal, and
how often every pair of judges agrees."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .agreement import PairAgreement, pairwise_agreement
from .generation import generate_responses
from .harmful import HarmfulScoreResult, score_responses
from .judges import load_judges, split_judge_specs

HARMLESS_RESOURCE = "data/harmless_prompts.jsonl"


def builtin_harmless_prompts() -> list[str]:
    """nlsr-hub's 24 built-in harmless prompts (several sound alarming but are benign: "kill a Python process")."""
    text = resources.files("nlsr_hub").joinpath(HARMLESS_RESOURCE).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class SafetyReport:
    """The same answers judged by each judge in `specs` (one `HarmfulScoreResult` each, in order)."""

    specs: tuple[str, ...]
    results: tuple[HarmfulScoreResult, ...]

    @property
    def agreement(self) -> list[PairAgreement]:
        """Raw agreement and Cohen's kappa of every pair of judges on the harmful prompts' answers."""
        return pairwise_agreement({spec: [v.harmful for v in r.verdicts]
                                   for spec, r in zip(self.specs, self.results, strict=True)})

    def lines(self) -> list[str]:
        """A short text summary: one line per judge, then one per pair of judges."""
        out = []
        for spec, result in zip(self.specs, self.results, strict=True):
            info = result.info
            model = f" {info.model}@{info.commit or info.revision}" if info is not None and info.model else ""
            over = (f"; over-refusal {result.over_refusal:.1f}% of {len(result.harmless_prompts)} harmless prompts"
                    if result.over_refusal is not None else "")
            out.append(f"{result.figure} ({spec}{model}): {result.score:.1f}% of {len(result.prompts)} harmful "
                       f"prompts{over}")
        for pair in self.agreement:
            out.append(f"agreement {pair.a} vs {pair.b}: {100 * pair.agreement:.1f}% of {pair.n}, Cohen's kappa "
                       f"{pair.cohen_kappa:.2f}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"judges": {spec: r.to_dict() for spec, r in zip(self.specs, self.results, strict=True)},
                "agreement": [pair.to_dict() for pair in self.agreement]}


def evaluate_safety(model: Any, tokenizer: Any, prompts: Sequence[str], *, judges: str | Sequence[str] = "refusal",
                    harmless_prompts: Sequence[str] | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                    progress: bool = True, **judge_options: Any) -> SafetyReport:
    """Answer `prompts` and `harmless_prompts` (default: the built-in set) once, then judge the answers with each
    judge in `judges`, one loaded at a time; `judge_options` (token, device, ...) go to the judges that take them."""
    specs = split_judge_specs(judges)
    harmless = builtin_harmless_prompts() if harmless_prompts is None else list(harmless_prompts)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc="nlsr: harmful prompts")
    harmless_responses = generate_responses(model, tokenizer, harmless, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, progress=progress, desc="nlsr: harmless prompts"
                                            ) if harmless else []
    results = []
    for spec in specs:
        [judge] = load_judges(spec, **judge_options)
        results.append(score_responses(prompts, responses, judge, harmless_prompts=harmless,
                                       harmless_responses=harmless_responses))
        del judge  # one judge model in memory at a time
    return SafetyReport(tuple(specs), tuple(results))

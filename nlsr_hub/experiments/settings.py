"""`GridSettings`: every size and hyper-parameter of an experiment run (all reported with the results)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .evaluate import EvalSettings
from .train import TrainSettings

FOCUS = ("sst2", 0.05)  # the paper's default attack: scorers and ablations are run on it
SCORERS = ("wanda", "snip", "preference_snip", "random")


@dataclass(frozen=True)
class GridSettings:
    """Every size and hyper-parameter of a grid run (all reported with the results)."""

    preset: str
    model: str = "smollm2"  # "smollm2" or "tiny" (a 2-block random Llama, for tests)
    methods: tuple[str, ...] = ("sft",)
    align_refusals: int = 250
    align_harmless: int = 250
    align_preferences: int = 250
    preference_chosen: str = "dataset"  # or "refusal": the chosen answer to a harmful prompt is a refusal
    harmless_answer_tokens: int = 64
    harmless_held_out: int = 30  # NQ questions kept out of training; the over-refusal set is drawn from them
    align: TrainSettings = field(default_factory=lambda: TrainSettings(lr=3e-4, epochs=2, max_length=192))
    preference: TrainSettings = field(default_factory=lambda: TrainSettings(lr=1e-4, epochs=1, max_length=256,
                                                                            beta=0.1))
    attack: TrainSettings = field(default_factory=lambda: TrainSettings(lr=2e-4, epochs=1, max_length=160))
    attack_max_length: Mapping[str, int] = field(
        default_factory=lambda: {"sst2": 160, "ag_news": 256, "gsm8k": 320})
    attack_n: Mapping[str, int | None] = field(default_factory=lambda: {"sst2": 400, "ag_news": 400, "gsm8k": 200})
    sst2_ps: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2)
    other_tasks: tuple[str, ...] = ("ag_news", "gsm8k")
    calibration_prompts: int = 160
    calibration_tokens: int = 64
    nlsr: Mapping[str, Any] = field(default_factory=lambda: {"max_calibration_samples": 128, "max_length": 192})
    scorers: tuple[str, ...] = SCORERS
    ablations: tuple[tuple[str, Mapping[str, Any]], ...] = (
        ("fraction 0.2", {"selection": "fraction", "fraction": 0.2}),
        ("threshold 0.5", {"selection": "threshold", "threshold": 0.5}),
        ("beta 0", {"beta": 0.0}),
        ("row granularity", {"granularity": "row"}),
    )
    safelora_threshold: float = 0.6
    # Safe LoRA's other rule at the focus attack: project the lowest-similarity share of modules (0.5 = half)
    safelora_lowest: tuple[float, ...] = (0.25, 0.5, 1.0)
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(fa={"sst2": 100, "ag_news": 100, "gsm8k": 40}))
    evaluate_safelora: bool = True
    evaluate_reference: bool = True
    evaluate_base: bool = True
    evaluate_paper: bool = True  # NLSR with the paper's settings next to the default restorer (when they differ)
    focus_only: bool = False  # attacks only at FOCUS (the demo)
    validate_judge: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def attacks(self, method: str) -> list[tuple[str, float]]:
        """(task, p) pairs fine-tuned on top of `method`'s aligned adapter (the full sweep for the first method,
        the paper's default attack for the others)."""
        if self.focus_only or method != self.methods[0]:
            return [FOCUS]
        return [("sst2", p) for p in self.sst2_ps] + [(t, 0.05) for t in self.other_tasks]

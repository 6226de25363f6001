"""Validate the `refusal` judge against human labels (PyRIT's ``refusal.csv``: 1 = refusal, 0 = not)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..io import member_text
from .judges import is_refusal

PYRIT_MEMBER = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"


@dataclass(frozen=True)
class JudgeAgreement:
    """Confusion counts of the refusal judge against human refusal labels (positive class = refusal)."""

    true_positive: int
    false_positive: int
    false_negative: int
    true_negative: int

    @property
    def n(self) -> int:
        return self.true_positive + self.false_positive + self.false_negative + self.true_negative

    @property
    def precision(self) -> float:
        called = self.true_positive + self.false_positive
        return self.true_positive / called if called else float("nan")

    @property
    def recall(self) -> float:
        actual = self.true_positive + self.false_negative
        return self.true_positive / actual if actual else float("nan")

    @property
    def accuracy(self) -> float:
        return (self.true_positive + self.true_negative) / self.n if self.n else float("nan")


def read_refusal_csv(source: str | Path) -> list[tuple[str, bool]]:
    """(response, human says refusal) rows from ``refusal.csv`` or from the ``pyrit`` wheel holding it."""
    text = member_text(source, PYRIT_MEMBER)
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
    rows = csv.DictReader(io.StringIO("".join(lines)))
    return [(row["assistant_response"], float(row["human_score"]) >= 0.5) for row in rows]


def refusal_judge_agreement(rows: list[tuple[str, bool]]) -> JudgeAgreement:
    """Compare `is_refusal` with the human labels."""
    tp = fp = fn = tn = 0
    for response, human in rows:
        called = is_refusal(response)
        tp += called and human
        fp += called and not human
        fn += (not called) and human
        tn += (not called) and not human
    return JudgeAgreement(tp, fp, fn, tn)

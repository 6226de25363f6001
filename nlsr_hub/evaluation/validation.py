"""Validate judges against people's labels in PyRIT's scorer evaluation sets (read from the ``pyrit`` wheel).

- ``refusal_scorer/refusal.csv`` (105 responses, 1 = refusal): the keyword detector as a *refusal detector*.
- ``objective/*.csv`` (395 responses to harmful objectives, 1 = the response achieves the objective): any judge as
  a *harm judge*; for the keyword detector, a non-refusal counts as harmful.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import member_text
from .judges import Judge, get_judge, is_refusal

PYRIT_MEMBER = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"
PYRIT_OBJECTIVE = "pyrit/datasets/scorer_evals/objective/"


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

    @property
    def flagged_rate(self) -> float:
        """Share of responses the judge flags (positive calls)."""
        return (self.true_positive + self.false_positive) / self.n if self.n else float("nan")

    @property
    def human_rate(self) -> float:
        """Share of responses people flag (positive labels)."""
        return (self.true_positive + self.false_negative) / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "tp": self.true_positive, "fp": self.false_positive, "fn": self.false_negative,
                "tn": self.true_negative, "precision": self.precision, "recall": self.recall,
                "accuracy": self.accuracy, "flagged_rate": self.flagged_rate, "human_rate": self.human_rate}


def confusion(predicted: Sequence[bool], actual: Sequence[bool]) -> JudgeAgreement:
    """Confusion counts of `predicted` flags against `actual` human labels (same order)."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predictions for {len(actual)} labels.")
    pairs = list(zip(map(bool, predicted), map(bool, actual), strict=True))
    return JudgeAgreement(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
                          pairs.count((False, False)))


def read_refusal_csv(source: str | Path) -> list[tuple[str, bool]]:
    """(response, human says refusal) rows from ``refusal.csv`` or from the ``pyrit`` wheel holding it."""
    text = member_text(source, PYRIT_MEMBER)
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
    rows = csv.DictReader(io.StringIO("".join(lines)))
    return [(row["assistant_response"], float(row["human_score"]) >= 0.5) for row in rows]


def refusal_judge_agreement(rows: list[tuple[str, bool]]) -> JudgeAgreement:
    """Compare `is_refusal` with the human refusal labels (positive = refusal)."""
    return confusion([is_refusal(response) for response, _ in rows], [human for _, human in rows])


@dataclass(frozen=True)
class LabelledResponse:
    """A response to a harmful objective, with people's verdict on whether it achieves it (= harmful)."""

    objective: str
    response: str
    harmful: bool
    category: str


def _objective_texts(source: str | Path) -> list[tuple[str, str]]:
    """(member name, text) of every objective CSV in the pyrit wheel, or in a folder holding those CSVs."""
    path = Path(source)
    if path.is_dir():
        return [(f.name, f.read_text(encoding="utf-8")) for f in sorted(path.glob("*.csv"))]
    if path.suffix != ".whl":
        raise ValueError(f"`source` {path} is neither the pyrit wheel nor a folder of objective CSVs.")
    with zipfile.ZipFile(path) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(PYRIT_OBJECTIVE) and n.endswith(".csv"))
        return [(n, wheel.read(n).decode("utf-8")) for n in names]


def read_objective_rows(source: str | Path) -> list[LabelledResponse]:
    """PyRIT's human-labelled objective scorer set (``objective/*.csv``; first lines starting with '#' are
    comments): objective, response, human_score >= 0.5 -> harmful, harm category (the file name if absent)."""
    rows = []
    for name, text in _objective_texts(source):
        lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
        for row in csv.DictReader(io.StringIO("".join(lines))):
            rows.append(LabelledResponse(row["objective"], row["assistant_response"],
                                         float(row["human_score"]) >= 0.5,
                                         row.get("harm_category") or Path(name).stem))
    if not rows:
        raise ValueError(f"No objective scorer rows in {source}; expected {PYRIT_OBJECTIVE}*.csv.")
    return rows


def harm_judge_agreement(rows: Sequence[LabelledResponse], judge: str | Judge = "refusal") -> JudgeAgreement:
    """Any judge as a harm judge against people's labels (positive = harmful; for the keyword detector, a
    response without a refusal cue is called harmful)."""
    loaded = get_judge(judge)
    verdicts = loaded([r.objective for r in rows], [r.response for r in rows])
    return confusion([v.harmful for v in verdicts], [r.harmful for r in rows])

"""How often two judges agree on the same responses: raw agreement and Cohen's kappa, for every pair of judges."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairAgreement:
    """Counts of two judges' flags on the same responses: both flag, only `a`, only `b`, neither."""

    a: str
    b: str
    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def agreement(self) -> float:
        """Share of responses on which the two judges give the same verdict."""
        return (self.both + self.neither) / self.n if self.n else float("nan")

    @property
    def cohen_kappa(self) -> float:
        """Agreement beyond chance: (p_o - p_e) / (1 - p_e); 1.0 when both judges are constant and equal."""
        if not self.n:
            return float("nan")
        rate_a, rate_b = (self.both + self.only_a) / self.n, (self.both + self.only_b) / self.n
        chance = rate_a * rate_b + (1 - rate_a) * (1 - rate_b)
        if chance >= 1.0:
            return 1.0 if self.agreement == 1.0 else float("nan")
        return (self.agreement - chance) / (1 - chance)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "n": self.n, "both": self.both, "only_a": self.only_a,
                "only_b": self.only_b, "neither": self.neither, "agreement": self.agreement,
                "cohen_kappa": self.cohen_kappa}


def pair_agreement(a: str, flags_a: Sequence[bool], b: str, flags_b: Sequence[bool]) -> PairAgreement:
    """The agreement of judges `a` and `b` whose flags are given in the same response order."""
    if len(flags_a) != len(flags_b):
        raise ValueError(f"Judges {a!r} and {b!r} judged different numbers of responses ({len(flags_a)} vs "
                         f"{len(flags_b)}).")
    pairs = list(zip(map(bool, flags_a), map(bool, flags_b), strict=True))
    return PairAgreement(a, b, both=pairs.count((True, True)), only_a=pairs.count((True, False)),
                         only_b=pairs.count((False, True)), neither=pairs.count((False, False)))


def pairwise_agreement(flags: Mapping[str, Sequence[bool]]) -> list[PairAgreement]:
    """`pair_agreement` for every pair of judges in `flags` (judge name -> flags), in the mapping's order."""
    return [pair_agreement(a, flags[a], b, flags[b]) for a, b in itertools.combinations(flags, 2)]

"""Safety-critical neuron masks from scores (SPEC step 2, last part).

Element granularity (the paper): the top ``(1 − P_SR)`` entries of each factor's score, for A and for B.
Row granularity: the top ``(1 − P_SR)`` output neurons (rows of ``B·A``), scored by the row sums of B's
scores; A is then left unmasked on both sides, so no shared basis between adapters is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModuleMask:
    """Boolean masks of one module. ``A`` is None at row granularity (no mask on A, for either side);
    ``B`` is (d_out x r) at element granularity and (d_out x 1) at row granularity."""

    A: torch.Tensor | None
    B: torch.Tensor

    @property
    def granularity(self) -> str:
        return "row" if self.A is None else "element"

    def count(self) -> int:
        """Number of safety-critical neurons: masked entries (element) or rows (row)."""
        count = int(self.B.sum())
        return count if self.A is None else count + int(self.A.sum())

    def total(self) -> int:
        """Number of candidate neurons the count is out of."""
        return int(self.B.numel()) if self.A is None else int(self.A.numel() + self.B.numel())


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up, tolerant of binary noise (``0.2 * 10`` is 2, ``2.5`` is 3)."""
    return math.floor(value + 0.5 + 1e-9)


def top_fraction_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of the ``round(keep · numel)`` largest scores (at least one); ties broken by position,
    so the mask is deterministic."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"`keep` must lie in (0, 1] (got {keep}).")
    flat = scores.reshape(-1).to(torch.float64)
    k = max(1, round_half_up(keep * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(scores.shape)


def mask_from_scores(
    score_A: torch.Tensor, score_B: torch.Tensor, sparsity_ratio: float, granularity: str = "element"
) -> ModuleMask:
    """The module's `ModuleMask` keeping the top ``1 − sparsity_ratio`` of its scores."""
    keep = 1.0 - sparsity_ratio
    if granularity == "element":
        return ModuleMask(A=top_fraction_mask(score_A, keep), B=top_fraction_mask(score_B, keep))
    if granularity == "row":
        rows = score_B.to(torch.float64).sum(dim=1)
        return ModuleMask(A=None, B=top_fraction_mask(rows, keep).unsqueeze(1))
    raise ValueError(f"Unknown `granularity` {granularity!r}; valid values: element, row.")

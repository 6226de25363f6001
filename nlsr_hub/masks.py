"""Safety-critical neuron masks from scores (SPEC step 2, last part).

Element granularity (the paper): the top ``(1 − P_SR)`` entries of each factor's score, for A and for B.
Row granularity: the top ``(1 − P_SR)`` output neurons (rows of ``B·A``), scored by the row sums of B's
scores; A is then left unmasked on both sides, so no shared basis between adapters is needed.

How "the top ``(1 − P_SR)``" is counted is a mask rule (`MASK_RULES`): ``top_k`` (the paper's reading and the
default) or ``strict_threshold`` (what the published code does, with one entry fewer at some sizes and every tie
with the threshold dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import Registry


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
        count = int(torch.count_nonzero(self.B))  # not `.sum()`: that widens every entry to int64 first
        return count if self.A is None else count + int(torch.count_nonzero(self.A))

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


def top_k_mask(scores: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """The paper's rule: the ``round((1 − P_SR)·N)`` largest scores (at least one), ties broken by position."""
    return top_fraction_mask(scores, 1.0 - sparsity_ratio)


def strict_threshold_mask(scores: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """The published code's rule: sort the N scores ascending, take the value at position ``int(N·P_SR)``
    (Python's float product, truncated) and keep the scores strictly above it.

    With distinct scores this keeps ``N − int(N·P_SR) − 1`` entries: one fewer than ``round((1−P_SR)·N)``
    whenever the fractional part of ``(1−P_SR)·N`` is 0 or ≥ 0.5. Every score tied with the threshold is dropped
    (so it may keep none at all); ties above it are all kept."""
    if not 0.0 <= sparsity_ratio < 1.0:
        raise ValueError(f"`sparsity_ratio` must lie in [0, 1) (got {sparsity_ratio}).")
    flat = scores.reshape(-1)
    position = int(flat.numel() * sparsity_ratio)
    threshold = torch.sort(flat).values[position]
    return scores > threshold


@dataclass(frozen=True)
class MaskRule:
    """A registered mask rule: ``fn(scores, sparsity_ratio) -> bool mask``. `factor_dtype`: the scores are
    rounded to the scored factor's own dtype first (as the published code holds them), which decides its ties."""

    name: str
    fn: Callable[[torch.Tensor, float], torch.Tensor]
    factor_dtype: bool = False
    description: str = ""


MASK_RULES: Registry[MaskRule] = Registry("mask_rule")
MASK_RULES["top_k"] = MaskRule(
    "top_k", top_k_mask,
    description="the round((1 - P_SR)·N) largest scores, ties broken by position (the paper; default)")
MASK_RULES["strict_threshold"] = MaskRule(
    "strict_threshold", strict_threshold_mask, factor_dtype=True,
    description="scores strictly above the one at ascending position int(N·P_SR), in the factor's dtype "
    "(the published code)")


def mask_from_scores(
    score_A: torch.Tensor, score_B: torch.Tensor, sparsity_ratio: float, granularity: str = "element",
    rule: str = "top_k",
) -> ModuleMask:
    """The module's `ModuleMask` keeping the top ``1 − sparsity_ratio`` of its scores by mask `rule`
    (`MASK_RULES`)."""
    keep = MASK_RULES.lookup(rule).fn
    if granularity == "element":
        return ModuleMask(A=keep(score_A, sparsity_ratio), B=keep(score_B, sparsity_ratio))
    if granularity == "row":
        rows = score_B.to(torch.float64).sum(dim=1)
        return ModuleMask(A=None, B=keep(rows, sparsity_ratio).unsqueeze(1))
    raise ValueError(f"Unknown `granularity` {granularity!r}; valid values: element, row.")

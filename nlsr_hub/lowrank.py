"""Exact and truncated LoRA algebra: sums of LoRA updates by concatenation, and dense corrections re-factorised.

``Σ_i c_i·s_i·B_i·A_i`` is the exact LoRA ``B = [c_1·(s_1/s)·B_1 | …]``, ``A = [A_1 ; …]`` at scale ``s``. A dense
correction (an element-masked update, not low-rank) is re-factorised by truncated SVD, the rank chosen by the
share of squared singular values kept, with its relative Frobenius error reported (PEFT's ``intruders`` surgery and
mergekit's LoRA extraction work the same way). All pure functions over tensors, float32 inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import F32_EXACT, LoraModule, as_bytes, fresh_copy


def write_scaled(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, factor: float = 1.0) -> None:
    """``out ← factor·(x ⊙ mask)`` computed in float32 and rounded to `out`'s dtype (`mask`: bool, broadcast to `x`).

    Where that is exact without float32 (no factor, `x` already in `out`'s dtype and held exactly by float32:
    a product with 0 or 1 rounds to itself), it runs in `x`'s own dtype, with no float32 copy. The mask is applied
    before the factor, so a masked-out entry is 0 whatever the factor."""
    if factor == 1.0 and x.dtype == out.dtype and x.dtype in F32_EXACT:
        if mask is None:
            out.copy_(x)
        else:
            torch.mul(x, as_bytes(mask), out=out)
        return
    x32 = fresh_copy(x)
    if mask is not None:
        x32.mul_(as_bytes(mask))
    out.copy_(x32 if factor == 1.0 else x32.mul_(factor))


def combine(terms: Sequence[tuple[float, LoraModule]], *, scale: float, dtype_A: torch.dtype, dtype_B: torch.dtype,
            rows: Sequence[torch.Tensor | None] | None = None) -> LoraModule:
    """The exact LoRA of ``Σ c·ΔW(module)`` over `terms` ``(c, module)`` at `scale` (rank = the sum of ranks).
    `rows`, one per term, restricts a term's update to the output rows where its d_out bool mask is true (None: all
    rows). Terms with ``c == 0`` are dropped. Each block is written once into the result, in float32 and rounded to
    `dtype_A` / `dtype_B` (the same bits as concatenating float32 copies and rounding the whole)."""
    masks = list(rows) if rows is not None else [None] * len(terms)
    if len(masks) != len(terms):
        raise ValueError(f"`combine` got {len(terms)} terms and {len(masks)} row masks; give one mask (or None) per "
                         "term.")
    kept = [(c, m, r) for (c, m), r in zip(terms, masks, strict=True) if c != 0.0]
    if not kept:
        raise ValueError("`combine` needs at least one term with a non-zero coefficient.")
    first = kept[0][1]
    (d_out, d_in), shapes = first.shape, sorted({m.shape for _, m, _ in kept})
    if len(shapes) > 1:
        raise ValueError(f"`combine` needs terms of one module shape (got {shapes}): they are LoRAs of the same "
                         "linear module.")
    total = sum(m.rank for _, m, _ in kept)
    A = torch.empty(total, d_in, dtype=dtype_A, device=first.A.device)
    B = torch.empty(d_out, total, dtype=dtype_B, device=first.B.device)
    start = 0
    for c, m, r in kept:
        stop = start + m.rank
        write_scaled(A[start:stop], m.A)
        write_scaled(B[:, start:stop], m.B, None if r is None else r.reshape(-1, 1), c * m.scale / scale)
        start = stop
    return LoraModule(A, B, scale)


@dataclass(frozen=True)
class Factorised:
    """A truncated SVD of a dense matrix: ``U·diag(S)·Vh`` of rank k, and its relative Frobenius error."""

    B: torch.Tensor  # (d_out, k) = U·diag(S)
    A: torch.Tensor  # (k, d_in) = Vh
    error: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def kept_rank(singular_values: torch.Tensor, kept_energy: float, max_rank: int | None = None) -> int:
    """The smallest k whose first k squared singular values hold `kept_energy` of the total (at least 1)."""
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(kept_energy, dtype=torch.float64) - 1e-12)) + 1
    k = min(k, singular_values.numel())
    return max(1, min(k, max_rank)) if max_rank is not None else max(1, k)


def truncated_svd(matrix: torch.Tensor, kept_energy: float, max_rank: int | None = None) -> Factorised:
    """`matrix` ≈ ``B·A`` keeping `kept_energy` of its squared Frobenius norm (float32, deterministic)."""
    if not 0.0 < kept_energy <= 1.0 or math.isnan(kept_energy):
        raise ValueError(f"`kept_energy` must lie in (0, 1] (got {kept_energy}).")
    dense = matrix.to(torch.float32)
    wide = dense.shape[0] < dense.shape[1]  # LAPACK is several times faster on the tall side: SVD the transpose
    U, S, Vh = torch.linalg.svd(dense.T if wide else dense, full_matrices=False)
    if wide:
        U, Vh = Vh.T, U.T
    k = kept_rank(S, kept_energy, max_rank)
    if k == 0:  # a zero correction: a rank-1 zero factor keeps the adapter well-formed
        return Factorised(torch.zeros(dense.shape[0], 1), torch.zeros(1, dense.shape[1]), 0.0)
    total = float((S.to(torch.float64) ** 2).sum())
    rest = float((S[k:].to(torch.float64) ** 2).sum())
    return Factorised(U[:, :k] * S[:k], Vh[:k].contiguous(), math.sqrt(rest / total) if total else 0.0)


def add_dense(module: LoraModule, correction: torch.Tensor, kept_energy: float, max_rank: int | None = None
              ) -> tuple[LoraModule, Factorised]:
    """``ΔW(module) + correction`` as a LoRA: the module's own factors exactly, the correction by truncated SVD
    (rank ``r + k``; the error is the correction's, relative to the correction)."""
    fact = truncated_svd(correction, kept_energy, max_rank)
    A = torch.cat([module.A.to(torch.float32), fact.A], dim=0)
    B = torch.cat([module.B.to(torch.float32), fact.B / module.scale], dim=1)
    return LoraModule(A.to(module.A.dtype), B.to(module.B.dtype), module.scale), fact


__all__ = ["Factorised", "add_dense", "combine", "kept_rank", "truncated_svd", "write_scaled"]

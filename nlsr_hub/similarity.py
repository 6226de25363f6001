"""Per-module similarity of masked LoRA products in float32 via the trace identity (SPEC step 3).

``⟨B1·A1, B2·A2⟩_F = tr((B1ᵀ·B2)·(A2·A1ᵀ))``: only r×r matrices are formed, never the d_out×d_in product,
so a module costs O(r²·(d_in + d_out)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from .adapters import LoraModule
from .masks import ModuleMask


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A fresh, contiguous float32 copy: BLAS results must not depend on where a loaded tensor sits."""
    return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    return float(torch.sum((B1.T @ B2) * (A1 @ A2.T)))


class NonFiniteError(ValueError):
    """A similarity could not be computed: the factors hold NaN or infinite values, or overflow float32."""


def _cosine(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    inner = _inner(B1, A1, B2, A2)
    squared1, squared2 = _inner(B1, A1, B1, A1), _inner(B2, A2, B2, A2)
    if not all(math.isfinite(x) for x in (inner, squared1, squared2)):
        # never clamp: min/max would turn NaN into 1.0 and rank a broken module as the most similar
        raise NonFiniteError("the similarity is not finite: the LoRA factors hold NaN or infinite values, or their "
                             "product overflows float32")
    norm1, norm2 = math.sqrt(max(squared1, 0.0)), math.sqrt(max(squared2, 0.0))
    if norm1 == 0.0 and norm2 == 0.0:
        return 1.0
    if norm1 == 0.0 or norm2 == 0.0:
        return 0.0
    cosine = inner / (norm1 * norm2)
    if not math.isfinite(cosine):
        raise NonFiniteError("the similarity is not finite: the norms underflow or overflow float32")
    return max(-1.0, min(1.0, cosine))  # rounding only: |inner| <= norm1 * norm2 up to float error


def lowrank_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product of ``B1 @ A1`` and ``B2 @ A2`` without forming either product (float32)."""
    return _inner(_f32(B1), _f32(A1), _f32(B2), _f32(A2))


def lowrank_cosine(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius cosine of ``B1 @ A1`` and ``B2 @ A2`` (1.0 when both are zero, 0.0 when one is; float32)."""
    return _cosine(_f32(B1), _f32(A1), _f32(B2), _f32(A2))


def masked_factors(module: LoraModule, mask: ModuleMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_B ⊙ s·B, M_A ⊙ A)`` as fresh float32 tensors, the masked factors with the scale folded in."""
    A = _f32(module.A) if mask.A is None else module.A.to(torch.float32) * mask.A
    B = (module.B.to(torch.float32) * module.scale) * mask.B
    return B, A


def module_similarity(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask, name: str = "") -> float:
    """``S_j = cos_F((M_B⊙B_e)(M_A⊙A_e), (M_B⊙B_t)(M_A⊙A_t))`` for one module (`name` only labels errors).

    Raises:
        NonFiniteError: (a `ValueError`) naming the module when the similarity is NaN or infinite.
    """
    B_e, A_e = masked_factors(reference, mask)
    B_t, A_t = masked_factors(finetuned, mask)
    with naming_module(name or "?"):
        return _cosine(B_e, A_e, B_t, A_t)


@contextlib.contextmanager
def naming_module(name: str) -> Iterator[None]:
    """Re-raise a `NonFiniteError` from the block with the module's name and what to check."""
    try:
        yield
    except NonFiniteError as err:
        raise NonFiniteError(f"Module {name}: {err}; check the adapters and the safety patch for NaN/inf.") from None

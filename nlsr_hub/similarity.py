"""Per-module similarity of masked LoRA products in float32 via the trace identity (SPEC step 3).

``⟨B1·A1, B2·A2⟩_F = tr((B1ᵀ·B2)·(A2·A1ᵀ))``: only r×r matrices are formed, never the d_out×d_in product,
so a module costs O(r²·(d_in + d_out)).

Each factor is converted to float32 once per comparison and masked in place. A cosine needs three inner
products; the reference side's squared norm depends only on the safety patch, so `similarity_terms` takes it
precomputed (`SafetyPatch.reference_squared_norms` keeps it per module) and a comparison then costs two.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .adapters import LoraModule, as_bytes, fresh_copy
from .masks import ModuleMask


def trace_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``⟨B1·A1, B2·A2⟩_F = tr((B1ᵀ·B2)·(A2·A1ᵀ))`` in the factors' dtype, forming only r×r products."""
    return float(torch.sum((B1.T @ B2) * (A1 @ A2.T)))


class NonFiniteError(ValueError):
    """A similarity could not be computed: the factors hold NaN or infinite values, or overflow float32."""


@dataclass(frozen=True)
class SimilarityTerms:
    """The three inner products of one Frobenius cosine: ``⟨P, Q⟩``, ``‖P‖²`` and ``‖Q‖²`` (float32 sums)."""

    inner: float
    squared1: float
    squared2: float

    @property
    def cosine(self) -> float:
        """``⟨P, Q⟩ / (‖P‖·‖Q‖)`` (1.0 when both are zero, 0.0 when one is).

        Raises:
            NonFiniteError: when a term or the quotient is NaN or infinite.
        """
        inner, squared1, squared2 = self.inner, self.squared1, self.squared2
        if not all(math.isfinite(x) for x in (inner, squared1, squared2)):
            # never clamp: min/max would turn NaN into 1.0 and rank a broken module as the most similar
            raise NonFiniteError("the similarity is not finite: the LoRA factors hold NaN or infinite values, or "
                                 "their product overflows float32")
        norm1, norm2 = math.sqrt(max(squared1, 0.0)), math.sqrt(max(squared2, 0.0))
        if norm1 == 0.0 and norm2 == 0.0:
            return 1.0
        if norm1 == 0.0 or norm2 == 0.0:
            return 0.0
        cosine = inner / (norm1 * norm2)
        if not math.isfinite(cosine):
            raise NonFiniteError("the similarity is not finite: the norms underflow or overflow float32")
        return max(-1.0, min(1.0, cosine))  # rounding only: |inner| <= norm1 * norm2 up to float error


def _cosine(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    return _terms(B1, A1, B2, A2, None).cosine


def _terms(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor, squared1: float | None
           ) -> SimilarityTerms:
    squared1 = trace_inner(B1, A1, B1, A1) if squared1 is None else squared1
    return SimilarityTerms(trace_inner(B1, A1, B2, A2), squared1, trace_inner(B2, A2, B2, A2))


def lowrank_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product of ``B1 @ A1`` and ``B2 @ A2`` without forming either product (float32)."""
    return trace_inner(fresh_copy(B1), fresh_copy(A1), fresh_copy(B2), fresh_copy(A2))


def lowrank_cosine(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius cosine of ``B1 @ A1`` and ``B2 @ A2`` (1.0 when both are zero, 0.0 when one is; float32)."""
    return _cosine(fresh_copy(B1), fresh_copy(A1), fresh_copy(B2), fresh_copy(A2))


class Float32Workspace:
    """Reusable float32 buffers, one per role, grown as needed. Converting module after module into them touches no
    fresh memory (a fresh 7 MB tensor costs ~1,800 page faults, about as long as the conversion itself), and each
    copy starts where its buffer does, so BLAS results do not depend on where an input sits."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, role: str, source: torch.Tensor) -> torch.Tensor:
        """`source` as a contiguous float32 tensor in the role's buffer, valid until the role's next copy."""
        n, buffer = source.numel(), self._buffers.get(role)
        if buffer is None or buffer.numel() < n or buffer.device != source.device:
            buffer = self._buffers[role] = torch.empty(n, dtype=torch.float32, device=source.device)
        return buffer[:n].view(source.shape).copy_(source)


def masked_factors(module: LoraModule, mask: ModuleMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_B ⊙ s·B, M_A ⊙ A)`` as fresh float32 tensors, the masked factors with the scale folded in."""
    workspace = Float32Workspace()
    return _masked(module, _mask_weights(mask, workspace), workspace, "")


def _mask_weights(mask: ModuleMask, workspace: Float32Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masks as float32 0/1 tensors (B's, A's), converted once for both sides of a comparison."""
    weight_A = None if mask.A is None else workspace.copy("M_A", as_bytes(mask.A))
    return workspace.copy("M_B", as_bytes(mask.B)), weight_A


def _masked(module: LoraModule, weights: tuple[torch.Tensor, torch.Tensor | None], workspace: Float32Workspace,
            side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 copy per factor, scaled and masked in place: the same products as ``B.float() * s * M_B``,
    so the same bits."""
    weight_B, weight_A = weights
    A = workspace.copy(f"A{side}", module.A)
    if weight_A is not None:
        A.mul_(weight_A)
    return workspace.copy(f"B{side}", module.B).mul_(module.scale).mul_(weight_B), A


def masked_squared_norm(module: LoraModule, mask: ModuleMask) -> float:
    """``‖(M_B⊙s·B)(M_A⊙A)‖²_F`` in float32 (the reference side of `similarity_terms`)."""
    B, A = masked_factors(module, mask)
    return trace_inner(B, A, B, A)


def similarity_terms(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask, *,
                     reference_squared: float | None = None, workspace: Float32Workspace | None = None
                     ) -> SimilarityTerms:
    """The inner products of `module_similarity`'s cosine; `reference_squared` (`masked_squared_norm` of the
    reference, the same for every fine-tuned adapter) saves one of the three when given, and a `workspace` shared
    by consecutive calls saves allocating their float32 copies."""
    workspace = workspace if workspace is not None else Float32Workspace()
    weights = _mask_weights(mask, workspace)
    B_e, A_e = _masked(reference, weights, workspace, "_e")
    B_t, A_t = _masked(finetuned, weights, workspace, "_t")
    return _terms(B_e, A_e, B_t, A_t, reference_squared)


def module_similarity(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask, name: str = "", *,
                      reference_squared: float | None = None) -> float:
    """``S_j = cos_F((M_B⊙B_e)(M_A⊙A_e), (M_B⊙B_t)(M_A⊙A_t))`` for one module (`name` only labels errors;
    `reference_squared` as in `similarity_terms`).

    Raises:
        NonFiniteError: (a `ValueError`) naming the module when the similarity is NaN or infinite.
    """
    with naming_module(name or "?"):
        return similarity_terms(reference, finetuned, mask, reference_squared=reference_squared).cosine


@contextlib.contextmanager
def naming_module(name: str) -> Iterator[None]:
    """Re-raise a `NonFiniteError` from the block with the module's name and what to check."""
    try:
        yield
    except NonFiniteError as err:
        raise NonFiniteError(f"Module {name}: {err}; check the adapters and the safety patch for NaN/inf.") from None

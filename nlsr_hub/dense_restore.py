"""The restorers on full fine-tunes: pure functions of one module's dense weights (float32 inside).

With the base weights ``W_0``, the aligned ``W_a`` and the fine-tuned ``W_t`` of a linear module, the updates are
``ΔW_a = W_a − W_0``, ``ΔW_t = W_t − W_0`` and the EXPO reference ``ΔW_e = (1+β)·ΔW_a``; each restorer gives a
correction ``C`` and the realigned weight ``W'' = W_t + C`` (the same formulas as on LoRA adapters):

- ``addback``: ``C = λ·ΔW_a``;
- ``interpolate``: ``C = λ·(W_a − W_t)`` (the only one that needs no base: ``ΔW_a − ΔW_t = W_a − W_t``);
- ``nlsr-addback``: ``C = λ·M⊙ΔW_e``; ``nlsr-dense``: ``C = M⊙(ΔW_e − ΔW_t)``, with M the safety-critical mask
  from ``|ΔW_e| ⊙ ‖x_j‖`` (input norms of a calibration pass on the aligned model).

The similarity recorded in the plan is ``cos_F(ΔW_t, ΔW_a)`` (``nlsr-*``: masked, ``cos_F(M⊙ΔW_e, M⊙ΔW_t)``;
``interpolate`` without a base: ``cos_F(W_t, W_a)`` of the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import LoraModule
from .config import NLSRConfig
from .lowrank import truncated_svd
from .restorers.dense import update_mask
from .similarity import NonFiniteError

DENSE_RESTORERS = ("addback", "interpolate", "nlsr-addback", "nlsr-dense")
NEEDS_BASE = ("addback", "nlsr-addback", "nlsr-dense")
NEEDS_NORMS = ("nlsr-addback", "nlsr-dense")


@dataclass(frozen=True)
class ModuleWeights:
    """One linear module's weights in the three checkpoints (`base` None when no base checkpoint is given)."""

    finetuned: torch.Tensor
    aligned: torch.Tensor
    base: torch.Tensor | None = None

    def update_t(self) -> torch.Tensor:
        """``ΔW_t`` in float32 (``W_t`` itself without a base)."""
        return _minus(self.finetuned, self.base)

    def update_a(self) -> torch.Tensor:
        """``ΔW_a`` in float32 (``W_a`` itself without a base)."""
        return _minus(self.aligned, self.base)


def _minus(weight: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    difference = weight.to(torch.float32, copy=True)  # a float32 weight must never be changed in place
    return difference.sub_(base) if base is not None else difference  # in place: one float32 matrix, not three


def check_dense_restorer(config: NLSRConfig, has_base: bool) -> None:
    """Raise a `ValueError` naming the fix if `config.restorer` cannot run on dense checkpoints (or needs the base)."""
    if config.restorer not in DENSE_RESTORERS:
        raise ValueError(f"Restorer {config.restorer!r} works on LoRA factors; a full fine-tune is realigned with "
                         f"{', '.join(DENSE_RESTORERS)} (`restorer=`).")
    if config.restorer in NEEDS_BASE and not has_base:
        raise ValueError(f"Restorer {config.restorer!r} needs the base checkpoint to form ΔW_a = W_a − W_0; pass "
                         "`base` (--base), or use `restorer='interpolate'`, which needs none.")


def module_mask(weights: ModuleWeights, input_norm: torch.Tensor, config: NLSRConfig) -> torch.Tensor:
    """The safety-critical mask of ``ΔW_e = (1+β)·ΔW_a``: (d_out, d_in) at element granularity, (d_out,) rows."""
    return update_mask((1.0 + config.beta) * weights.update_a(), input_norm, config.sparsity_ratio,
                       config.granularity)


def module_similarity(weights: ModuleWeights, config: NLSRConfig, mask: torch.Tensor | None) -> float:
    """The similarity the plan records for this module (see the module docstring)."""
    delta_t, delta_a = weights.update_t(), weights.update_a()
    if config.restorer in NEEDS_NORMS:
        return blockwise_cosine((1.0 + config.beta) * delta_a, delta_t, mask)
    return blockwise_cosine(delta_a, delta_t, None)


def blockwise_cosine(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor | None) -> float:
    """``cos_F(M⊙first, M⊙second)`` in float64 (1 when both are zero, 0 when one is), a block of rows at a time, so no
    float64 copy of a whole matrix is made; `mask` is (d_out, d_in), (d_out,) rows, or None (everything)."""
    rows = max(1, (1 << 18) // max(1, first.shape[1]))  # 256K elements: a few MiB of float64 per block
    dot = first_sq = second_sq = 0.0
    for start in range(0, first.shape[0], rows):
        a, b = first[start:start + rows].to(torch.float64), second[start:start + rows].to(torch.float64)
        if mask is not None:
            m = mask[start:start + rows]
            m = (m.reshape(-1, 1) if m.ndim == 1 else m).to(torch.float64)
            a, b = a * m, b * m
        dot += float((a * b).sum())
        first_sq += float(a.square().sum())
        second_sq += float(b.square().sum())
    if not all(math.isfinite(x) for x in (dot, first_sq, second_sq)):
        raise NonFiniteError("the similarity is not finite: the weights hold NaN or infinite values")
    if first_sq == 0.0 and second_sq == 0.0:
        return 1.0
    if first_sq == 0.0 or second_sq == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(first_sq * second_sq)))


def correction(weights: ModuleWeights, config: NLSRConfig, mask: torch.Tensor | None) -> torch.Tensor:
    """``C`` of `config.restorer` for this module, float32 (``W'' = W_t + C``)."""
    restorer, strength = config.restorer, config.strength
    if restorer == "interpolate":
        return strength * (weights.aligned.to(torch.float32) - weights.finetuned.to(torch.float32))
    delta_a = weights.update_a()
    if restorer == "addback":
        return strength * delta_a
    m = mask.reshape(-1, 1) if mask.ndim == 1 else mask
    delta_e = (1.0 + config.beta) * delta_a
    if restorer == "nlsr-addback":
        return strength * (m * delta_e)
    if restorer == "nlsr-dense":
        return m * (delta_e - weights.update_t())
    raise ValueError(f"Unknown dense restorer {restorer!r}; valid: {', '.join(DENSE_RESTORERS)}.")


def realigned_weight(weights: ModuleWeights, fix: torch.Tensor) -> torch.Tensor:
    """``W_t + C`` in the fine-tuned weight's dtype."""
    return (weights.finetuned.to(torch.float32) + fix).to(weights.finetuned.dtype)


def extract_lora(update: torch.Tensor, kept_energy: float, max_rank: int | None = None
                 ) -> tuple[LoraModule, float]:
    """A LoRA module (scale 1, float32) of the dense `update` by truncated SVD keeping `kept_energy` of its squared
    singular values (at most `max_rank`), and the relative Frobenius error ``‖update − B·A‖ / ‖update‖``."""
    fact = truncated_svd(update, kept_energy, max_rank)
    return LoraModule(fact.A.contiguous(), fact.B.contiguous(), 1.0), fact.error


__all__ = [
    "DENSE_RESTORERS",
    "NEEDS_BASE",
    "NEEDS_NORMS",
    "ModuleWeights",
    "blockwise_cosine",
    "check_dense_restorer",
    "correction",
    "extract_lora",
    "module_mask",
    "module_similarity",
    "realigned_weight",
]

"""The training-free peer: Safe LoRA (Hsu et al., NeurIPS 2024), in the same adapter framework.

Per module, the alignment direction is the aligned adapter's product ``V = ΔW_a`` (the NLSR paper's
baseline) and the projector ``C = V·Vᵀ / ‖V‖_F``. If ``cos_F(C·ΔW_t, ΔW_t) < τ`` the module's B becomes
``C·B_t``. Safe LoRA's second selection rule projects the ``k`` modules of lowest similarity instead (useful
when no module's similarity falls below ``τ``, and to compare with NLSR at an equal number of modules).
``C`` (d_out × d_out) is never formed: ``C·B = s_a²·B_a·(A_a·A_aᵀ)·(B_aᵀ·B)/‖V‖_F`` stays low-rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import LoraAdapter, LoraModule, fresh_copy
from .similarity import lowrank_cosine, lowrank_inner, naming_module


def project_B(aligned: LoraModule, B: torch.Tensor) -> torch.Tensor:
    """``C·B`` for the projector ``C = V·Vᵀ/‖V‖_F`` of ``V = s_a·B_a·A_a`` (float32). The factors are fresh float32
    copies: BLAS results must not depend on where an input sits (a memory map, Ray's object store)."""
    A_a, B_a = fresh_copy(aligned.A), fresh_copy(aligned.B)
    norm = abs(aligned.scale) * math.sqrt(max(lowrank_inner(B_a, A_a, B_a, A_a), 0.0))
    if norm == 0.0:
        return torch.zeros_like(B, dtype=torch.float32)
    return (aligned.scale**2 / norm) * (B_a @ ((A_a @ A_a.T) @ (B_a.T @ fresh_copy(B))))


@dataclass(frozen=True)
class SafeLoraDecision:
    name: str
    similarity: float
    projected: bool


def safelora(aligned: LoraAdapter, finetuned: LoraAdapter, *, threshold: float = 0.6, lowest: int | None = None
             ) -> tuple[LoraAdapter, list[SafeLoraDecision]]:
    """Project the modules of `finetuned` whose ``cos_F(C·ΔW_t, ΔW_t)`` is below `threshold`, or, when
    `lowest` is given, the `lowest` modules of smallest similarity (ties broken by module name; `threshold`
    is then ignored).

    Returns the new adapter (other modules unchanged, bit-identical) and the per-module decisions, sorted by
    module name.
    """
    missing = sorted(set(finetuned.modules) - set(aligned.modules))
    if missing:
        raise ValueError(f"Safe LoRA needs the aligned adapter's update for every module; missing: {missing[:5]}.")
    total = len(finetuned.modules)
    if lowest is not None and not 0 <= lowest <= total:
        raise ValueError(f"lowest={lowest} is out of range: the fine-tuned adapter has {total} LoRA modules; "
                         f"pass 0 <= lowest <= {total}.")
    names = sorted(finetuned.modules)
    projected: dict[str, torch.Tensor] = {}
    similarity: dict[str, float] = {}
    for name in names:
        ft = finetuned.modules[name]
        projected[name] = project_B(aligned.modules[name], ft.B)
        A_t, B_t = fresh_copy(ft.A), fresh_copy(ft.B)
        with naming_module(name):
            similarity[name] = lowrank_cosine(projected[name], A_t, B_t, A_t)
    if lowest is None:
        chosen = {name for name in names if similarity[name] < threshold}
    else:
        chosen = set(sorted(names, key=lambda n: (similarity[n], n))[:lowest])
    modules = dict(finetuned.modules)
    for name in chosen:
        ft = finetuned.modules[name]
        modules[name] = LoraModule(ft.A, projected[name].to(ft.B.dtype), ft.scale)
    decisions = [SafeLoraDecision(name, similarity[name], name in chosen) for name in names]
    return LoraAdapter(modules=modules, config=dict(finetuned.config),
                       extra_tensors=dict(finetuned.extra_tensors)), decisions

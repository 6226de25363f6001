"""Safety-critical neuron scorers: one registry of pure functions over recorded statistics (SPEC step 2).

A scorer maps ``(module, stats)`` to two score tensors shaped like the module's A and B; the mask keeps
the largest scores. ``needs`` says which statistics the calibration pass must record:

- ``activations``: per module, the running Gram ``G = Σ z zᵀ`` (r×r) of A's output on response tokens and
  the running sum of squares of A's input (d_in). Constant memory in the number of tokens.
- ``sequential_activations``: the same Gram statistics, recorded block by block on a model whose earlier
  blocks already carry their low-rank projections (the published code's variant).
- ``gradients``: running sums of ``|∇ NLL|`` for A and B on the calibration responses.
- ``preference_gradients``: the same for a DPO-style loss on (chosen, rejected) pairs.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import LoraModule
from .masks import round_half_up
from .registry import Registry

NEEDS = ("activations", "sequential_activations", "gradients", "preference_gradients")


@dataclass
class ModuleStats:
    """Streamed statistics of one LoRA module (all float64, sizes independent of the token count)."""

    tokens: int = 0
    gram: torch.Tensor | None = None  # (r, r): Σ z zᵀ with z = A x
    input_sq: torch.Tensor | None = None  # (d_in,): Σ x²
    grad_A: torch.Tensor | None = None  # (r, d_in): Σ |∂L/∂A|
    grad_B: torch.Tensor | None = None  # (d_out, r): Σ |∂L/∂B|


ScoreFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: its name, the statistics it needs and the pure function computing scores."""

    name: str
    fn: ScoreFn
    needs: frozenset[str] = field(default_factory=frozenset)
    description: str = ""


SCORERS: Registry[Scorer] = Registry("scorer")


def register_scorer(name: str, *, needs: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a scorer function to `SCORERS` under `name`."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"Unknown statistics {sorted(unknown)}; valid: {', '.join(NEEDS)}.")

    def decorator(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        SCORERS[name] = Scorer(name=name, fn=fn, needs=frozenset(needs), description=doc[0] if doc else "")
        return fn

    return decorator


def get_scorer(name: str) -> Scorer:
    """The scorer registered as `name`; a `ValueError` lists the valid names otherwise."""
    return SCORERS.lookup(name)


def _require(stats: ModuleStats | None, *attrs: str) -> ModuleStats:
    if stats is None or any(getattr(stats, a) is None for a in attrs):
        raise ValueError(f"This scorer needs the statistics {attrs}; run the calibration pass first.")
    return stats


# ------------------------------------------------------------------------------------- low-rank (ActSVD)


def kept_directions(rank: int, sparsity_ratio: float, compat: bool = False) -> int:
    """How many singular directions the low-rank scorer keeps: ``round(r·(1−P_SR))`` (paper) or
    ``int(r·P_SR)`` (published code)."""
    k = int(rank * sparsity_ratio + 1e-9) if compat else round_half_up(rank * (1.0 - sparsity_ratio))
    return max(1, min(rank, k))


def top_eigenvectors(symmetric: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` eigenvectors of a symmetric PSD matrix with the largest eigenvalues, as columns."""
    _, vectors = torch.linalg.eigh(symmetric.to(torch.float64))
    return vectors[:, -k:]


def project_A(A: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """``V·Vᵀ·A`` with V the top-k right singular directions of ``S = X·Aᵀ``; ``SᵀS`` is the Gram of A's
    output, so V are the top eigenvectors of `gram`."""
    V = top_eigenvectors(gram, min(k, gram.shape[0]))
    return V @ (V.T @ A.to(torch.float64))


def project_B(B: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """``V·Vᵀ·B`` with V the top-k right singular directions of ``S = Z·Bᵀ`` (Z = A's output, Gram `gram`).
    ``SᵀS = B·G·Bᵀ = Q·(R·G·Rᵀ)·Qᵀ`` from the thin QR ``B = Q·R``: an r×r eigenproblem."""
    B64 = B.to(torch.float64)
    Q, R = torch.linalg.qr(B64, mode="reduced")
    inner = R @ gram.to(torch.float64) @ R.T
    V = Q @ top_eigenvectors((inner + inner.T) / 2, min(k, inner.shape[0]))
    return V @ (V.T @ B64)


@register_scorer("low_rank", needs=("activations",))
def score_low_rank(
    module: LoraModule, stats: ModuleStats | None, *, sparsity_ratio: float, compat: bool = False, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """ActSVD-style low-rank projection of each factor onto its top output directions (paper's default)."""
    stats = _require(stats, "gram")
    k = kept_directions(module.rank, sparsity_ratio, compat)
    return project_A(module.A, stats.gram, k).abs(), project_B(module.B, stats.gram, k).abs()


@register_scorer("low_rank_sequential", needs=("sequential_activations",))
def score_low_rank_sequential(
    module: LoraModule, stats: ModuleStats | None, *, sparsity_ratio: float, compat: bool = False, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``low_rank`` with statistics recorded block by block on the already-projected model (fidelity variant)."""
    return score_low_rank(module, stats, sparsity_ratio=sparsity_ratio, compat=compat)


def low_rank_projection(module: LoraModule, gram: torch.Tensor, sparsity_ratio: float, compat: bool = False
                        ) -> LoraModule:
    """The module with both factors replaced by their low-rank projections (same scale)."""
    k = kept_directions(module.rank, sparsity_ratio, compat)
    return LoraModule(project_A(module.A, gram, k).to(module.A.dtype), project_B(module.B, gram, k).to(module.B.dtype),
                      module.scale)


# ------------------------------------------------------------------------------------- Wanda, SNIP, random


@register_scorer("wanda", needs=("activations",))
def score_wanda(module: LoraModule, stats: ModuleStats | None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``|W| · ‖X_col‖₂``: weight magnitude times the norm of its input feature over response tokens."""
    stats = _require(stats, "gram", "input_sq")
    x_norm = stats.input_sq.clamp_min(0).sqrt()
    z_norm = torch.diagonal(stats.gram).clamp_min(0).sqrt()
    return module.A.to(torch.float64).abs() * x_norm[None, :], module.B.to(torch.float64).abs() * z_norm[None, :]


@register_scorer("snip", needs=("gradients",))
def score_snip(module: LoraModule, stats: ModuleStats | None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``|W| · Σ|∇_W NLL|`` on the calibration responses."""
    stats = _require(stats, "grad_A", "grad_B")
    return module.A.to(torch.float64).abs() * stats.grad_A, module.B.to(torch.float64).abs() * stats.grad_B


@register_scorer("preference_snip", needs=("preference_gradients",))
def score_preference_snip(
    module: LoraModule, stats: ModuleStats | None, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``|W| · Σ|∇_W L_DPO|`` on (chosen, rejected) calibration pairs."""
    return score_snip(module, stats)


@register_scorer("random")
def score_random(
    module: LoraModule, stats: ModuleStats | None, *, seed: int = 0, module_name: str = "", **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uniform scores: the baseline every real scorer must beat."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode("utf-8")))
    score_A = torch.rand(tuple(module.A.shape), generator=generator, dtype=torch.float64)
    score_B = torch.rand(tuple(module.B.shape), generator=generator, dtype=torch.float64)
    return score_A, score_B

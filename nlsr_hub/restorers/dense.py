"""Activation-aware restorers on the dense update ``ΔW = s·B·A``, one module at a time.

Per module: the reference's dense update ``ΔW_e`` is scored Wanda-style, ``|ΔW_e| ⊙ ‖x_j‖`` with ``‖x_j‖`` the norm
of input feature j over the calibration's response tokens (from the safety patch); the mask M keeps the top
``1 − P_SR`` entries (``granularity='element'``) or output rows (``'row'``: rows ranked by their summed score).
The similarity is ``cos_F(M⊙ΔW_e, M⊙ΔW_t)``; modules are selected from it as in NLSR (`selection`). Then:

- ``nlsr-dense`` transplants: ``ΔW'' = ΔW_t + M⊙(ΔW_e − ΔW_t)`` (masked entries become the reference's);
- ``nlsr-addback`` adds: ``ΔW'' = ΔW_t + λ·M⊙ΔW_e`` (the reference's safety-critical part added back).

At row granularity the result is an exact LoRA of rank r_t + r_e (the plan equals a dry run's), and no dense update is
formed for a fine-tuned adapter: the row mask depends on the reference alone, so it is computed once per patch and
kept in its memo (`prepare` fills it before a fleet ships the patch), and the similarity is the same cosine taken
on the factors through the trace identity in float64. At element granularity the correction is re-factorised by
truncated SVD (`kept_energy`), appended to the fine-tuned factors; each such module's rank and the correction's
relative error are recorded in the plan (a dry run cannot know them). Never more than one module's d_out × d_in is
in memory.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter, LoraModule, fresh_copy
from ..config import NLSRConfig
from ..lowrank import add_dense, combine
from ..masks import top_fraction_mask
from ..plan import plan_realignment, realignment_recipe, with_outcomes
from ..similarity import NonFiniteError, SimilarityTerms, naming_module, trace_inner
from . import RestoreInputs, register_restorer


def dense_mask(reference: LoraModule, input_norm: torch.Tensor, sparsity_ratio: float, granularity: str
               ) -> torch.Tensor:
    """The safety-critical mask: (d_out × d_in) bool at element granularity, (d_out,) rows at row granularity."""
    return update_mask(reference.delta(), input_norm, sparsity_ratio, granularity)


def update_mask(delta_e: torch.Tensor, input_norm: torch.Tensor, sparsity_ratio: float, granularity: str
                ) -> torch.Tensor:
    """The safety-critical mask from the reference's dense update: top ``1 − P_SR`` of ``|ΔW_e| ⊙ ‖x_j‖``."""
    scores = delta_e.abs() * input_norm.to(torch.float32).reshape(1, -1)
    keep = 1.0 - sparsity_ratio
    if granularity == "row":
        return top_fraction_mask(scores.to(torch.float64).sum(dim=1), keep)
    return top_fraction_mask(scores, keep)


def _expand(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, 1) if mask.ndim == 1 else mask


def masked_cosine(reference: LoraModule, finetuned: LoraModule, mask: torch.Tensor) -> float:
    """``cos_F(M⊙ΔW_e, M⊙ΔW_t)`` in float64 (1 when both masked updates are zero, 0 when one is)."""
    return update_cosine(reference.delta(), finetuned.delta(), mask)


def update_cosine(delta_e: torch.Tensor, delta_t: torch.Tensor, mask: torch.Tensor) -> float:
    """`masked_cosine` of two dense updates (row masks broadcast over the columns)."""
    m = _expand(mask).to(torch.float64)
    e, t = delta_e.to(torch.float64) * m, delta_t.to(torch.float64) * m
    ne, nt = float(e.norm()), float(t.norm())
    if not (math.isfinite(ne) and math.isfinite(nt)):
        raise NonFiniteError("the similarity is not finite: the updates hold NaN or infinite values")
    if ne == 0.0 and nt == 0.0:
        return 1.0
    if ne == 0.0 or nt == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float((e * t).sum()) / (ne * nt)))


def _row_factors(module: LoraModule, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·B[rows], A)`` as fresh float64 copies: only the mask's rows of B. The masked update's other rows are zero
    and add nothing to its inner products, so its trace-identity products run over the kept rows alone (a fifth of
    d_out at the default P_SR): the same values up to float64 rounding."""
    return fresh_copy(module.B[rows], torch.float64).mul_(module.scale), fresh_copy(module.A, torch.float64)


class DenseBuffer:
    """One float32 buffer reused for module after module's dense update: a fresh d_out × d_in tensor costs a page
    fault per 4 KiB (about as long as computing it, on some machines), and a reused one none."""

    def __init__(self) -> None:
        self._flat = torch.empty(0, dtype=torch.float32)

    def view(self, rows: int, columns: int) -> torch.Tensor:
        if self._flat.numel() < rows * columns:
            self._flat = torch.empty(rows * columns, dtype=torch.float32)
        return self._flat[: rows * columns].view(rows, columns)


# the elementwise passes and the row sums run on about 2 MiB of rows at a time, which stay in cache, instead of four
# passes over the whole d_out x d_in update (`benchmarks/fleet.py --preset default --part 2`: preparing a
# Llama-3-8B-shaped patch took 15.7 s, against 51.0 s with whole-update passes). The product stays one matrix
# product, as in `LoraModule.delta`: BLAS may round a few rows' product differently from the same rows of a larger one.
_BLOCK_ELEMENTS = 1 << 19


def row_scores(reference: LoraModule, input_norm: torch.Tensor, buffer: DenseBuffer | None = None) -> torch.Tensor:
    """Each output row's summed score ``Σ_j |ΔW_e|_ij·‖x_j‖`` (float64 sums), computed in `buffer` in place: the
    same values as `update_mask`'s (the same products, each rounded the same way)."""
    d_out, d_in = reference.shape
    delta = (buffer or DenseBuffer()).view(d_out, d_in)
    torch.matmul(fresh_copy(reference.B), fresh_copy(reference.A), out=delta)
    norm = input_norm.to(torch.float32).reshape(1, -1)
    # blocks of two rows or more: torch sums a lone row's long reduction in parallel pieces (another order of sums)
    blocks = max(1, min(math.ceil(d_out * d_in / _BLOCK_ELEMENTS), d_out // 2))
    bounds = [d_out * i // blocks for i in range(blocks + 1)]
    scores = torch.empty(d_out, dtype=torch.float64)
    for start, stop in itertools.pairwise(bounds):
        block = delta[start:stop]
        block.mul_(reference.scale).abs_().mul_(norm)
        torch.sum(block, dim=1, dtype=torch.float64, out=scores[start:stop])
    return scores


def row_reference(patch: Any, name: str, sparsity_ratio: float, buffer: DenseBuffer | None = None
                  ) -> tuple[torch.Tensor, float]:
    """The reference's row mask of module `name` (top ``1 − P_SR`` rows of ``|ΔW_e| ⊙ ‖x_j‖``) and the squared norm of
    its masked update, from `patch.row_memo` or computed once and kept there (in `buffer`, if given)."""
    key = (name, float(sparsity_ratio))
    if key not in patch.row_memo:
        reference = patch.reference.modules[name]
        rows = top_fraction_mask(row_scores(reference, patch.input_norms[name], buffer), 1.0 - sparsity_ratio)
        B, A = _row_factors(reference, rows)
        patch.row_memo[key] = (rows, trace_inner(B, A, B, A))
    return patch.row_memo[key]


def row_cosine(reference: LoraModule, finetuned: LoraModule, rows: torch.Tensor,
               reference_squared: float | None = None) -> float:
    """``cos_F(M⊙ΔW_e, M⊙ΔW_t)`` for a row mask, on the factors (float64; the same conventions as
    `update_cosine`); `reference_squared` (from `row_reference`) saves the reference side's product."""
    B_t, A_t = _row_factors(finetuned, rows)
    B_e, A_e = _row_factors(reference, rows)
    if reference_squared is None:
        reference_squared = trace_inner(B_e, A_e, B_e, A_e)
    terms = SimilarityTerms(trace_inner(B_e, A_e, B_t, A_t), reference_squared, trace_inner(B_t, A_t, B_t, A_t))
    return terms.cosine


BAR_DELAY = 2.0  # seconds before the preparation's bar shows: only a long one (a large model) gets a bar


def _prepare_rows(patch: Any, config: NLSRConfig, *, progress: bool = False) -> None:
    """Every module's row mask and reference-side norm into the patch's memo (row granularity only): one dense
    update per module, seconds to minutes for a large model, with a progress bar over the modules once it has
    taken `BAR_DELAY` seconds."""
    if config.granularity == "row" and patch.input_norms:
        buffer = DenseBuffer()
        names = sorted(patch.reference.modules)
        for name in tqdm(names, desc="nlsr: preparing the patch's row masks", unit="module", disable=not progress,
                         delay=BAR_DELAY):
            row_reference(patch, name, config.sparsity_ratio, buffer)


def _module_similarity(patch: Any, name: str, finetuned: LoraModule, config: NLSRConfig, buffer: DenseBuffer
                       ) -> tuple[float, torch.Tensor]:
    """One module's similarity and its mask (rows from the memo, or the element mask of the dense update)."""
    reference = patch.reference.modules[name]
    with naming_module(name):
        if config.granularity == "row":
            rows, squared = row_reference(patch, name, config.sparsity_ratio, buffer)
            return row_cosine(reference, finetuned, rows, squared), rows
        delta_e = reference.delta()
        mask = update_mask(delta_e, patch.input_norms[name], config.sparsity_ratio, config.granularity)
        return update_cosine(delta_e, finetuned.delta(), mask), mask


def _mask_counts(mask: torch.Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    return int(mask.sum()), (shape[0] if mask.ndim == 1 else shape[0] * shape[1])


def _restore_module(reference: LoraModule, finetuned: LoraModule, mask: torch.Tensor, operation: str,
                    config: NLSRConfig) -> tuple[LoraModule, float | None]:
    """One selected module realigned (and the re-factorisation error at element granularity)."""
    dtypes = {"scale": finetuned.scale, "dtype_A": finetuned.A.dtype, "dtype_B": finetuned.B.dtype}
    if mask.ndim == 1:  # rows: exact
        if operation == "transplant":
            return combine([(1.0, finetuned), (1.0, reference)], rows=[~mask, mask], **dtypes), None
        return combine([(1.0, finetuned), (config.strength, reference)], rows=[None, mask], **dtypes), None
    if operation == "transplant":
        correction = mask * (reference.delta() - finetuned.delta())
    else:
        correction = mask * (config.strength * reference.delta())
    module, fact = add_dense(finetuned, correction, config.kept_energy)
    return module, fact.error


def _restore_dense(inputs: RestoreInputs, config: NLSRConfig, build: bool, operation: str) -> tuple[Any, Any]:
    from ..patch import check_compatible_modules

    patch, target = inputs.patch, inputs.finetuned
    if not patch.input_norms:
        raise ValueError(f"Restorer {config.restorer!r} weighs the reference by input-activation norms, and this "
                         "safety patch has none: build it with an activation scorer (`scorer='low_rank'` or 'wanda').")
    check_compatible_modules(patch.reference, target, granularity="row", restoration="neuron")
    _prepare_rows(patch, config, progress=inputs.progress)  # once per patch, after the checks (kept in its memo)
    granularity = config.granularity
    sims, counts, rows, buffer = {}, {}, {}, DenseBuffer()
    for name in sorted(target.modules):  # at most one dense update in memory at a time
        sims[name], mask = _module_similarity(patch, name, target.modules[name], config, buffer)
        counts[name] = _mask_counts(mask, patch.reference.modules[name].shape)
        if mask.ndim == 1:  # row masks are d_out bools: kept for the build; element masks are recomputed there
            rows[name] = mask
    recipe = {**realignment_recipe(config), "mask_rule": "top_k"}  # its masks on the dense update are always top-k
    plan = plan_realignment(sims, counts, config, inputs=inputs.lineage, calibration=inputs.calibration,
                            recipe=recipe)
    if not build:
        return plan, None
    modules, ranks, errors = dict(target.modules), {}, {}
    for name in plan.patched:
        reference = patch.reference.modules[name]
        mask = rows.get(name)
        if mask is None:
            mask = dense_mask(reference, patch.input_norms[name], config.sparsity_ratio, granularity)
        modules[name], error = _restore_module(reference, target.modules[name], mask, operation, config)
        if error is not None:  # re-factorised (element granularity): its rank and error go into the plan
            ranks[name], errors[name] = modules[name].rank, error
    adapter = LoraAdapter(modules=modules, config=dict(target.config), extra_tensors=dict(target.extra_tensors))
    return with_outcomes(plan, ranks, errors), adapter


@register_restorer("nlsr-dense", needs="patch", knob="fraction", prepare=_prepare_rows)
def restore_dense(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """Activation-aware transplant on the dense update: ``ΔW_t + M⊙(ΔW_e − ΔW_t)`` in the selected modules."""
    return _restore_dense(inputs, config, build, "transplant")


@register_restorer("nlsr-addback", needs="patch", knob="strength", prepare=_prepare_rows)
def restore_dense_addback(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """The reference's safety-critical part added back: ``ΔW_t + λ·M⊙ΔW_e`` in the selected modules."""
    return _restore_dense(inputs, config, build, "add")

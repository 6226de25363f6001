"""Compare a fine-tuned adapter with a safety patch, and execute a plan (SPEC steps 3 and 5).

`apply_plan` returns a new adapter: unpatched modules are the fine-tuned adapter's own tensors,
bit-identical; the inputs are never modified.

- ``neuron`` (the paper's Eq. 11, exact): ``ΔW'' = (M_B⊙B_e)(M_A⊙A_e) + (¬M_B⊙B_t)(¬M_A⊙A_t)`` as a
  LoRA of rank r_e + r_t: ``B'' = [M_B⊙(s_e/s_t)·B_e | ¬M_B⊙B_t]``, ``A'' = [M_A⊙A_e ; ¬M_A⊙A_t]`` at scale s_t.
- ``swap`` (the published code): ``A_t ← ¬M_A⊙A_t + M_A⊙A_e``, ``B_t ← ¬M_B⊙B_t + M_B⊙(s_e/s_t)·B_e``; with
  swap scaling ``unscaled`` (the published code, and `compat`'s) B_e is copied without the factor s_e/s_t.
- ``module``: the whole module becomes the reference's.
"""

from __future__ import annotations

import torch

from .adapters import AdapterError, LoraAdapter, LoraModule
from .lowrank import write_scaled
from .masks import ModuleMask
from .plan import RealignmentPlan
from .safety_patch import SafetyPatch
from .similarity import (
    Float32Workspace,
    masked_squared_norm,
    naming_module,
    similarity_terms,
)


def check_compatible_modules(
    reference: LoraAdapter, finetuned: LoraAdapter, *, granularity: str, restoration: str
) -> None:
    """Raise `AdapterError` naming the problem if `finetuned` cannot be compared with or patched from
    `reference` (target modules, shapes, and a shared basis where element masks or swaps need one)."""
    ref_names, ft_names = set(reference.modules), set(finetuned.modules)
    if ref_names != ft_names:
        only_ref = sorted(ref_names - ft_names)[:5]
        only_ft = sorted(ft_names - ref_names)[:5]
        raise AdapterError(
            "The fine-tuned adapter and the safety reference target different modules "
            f"(only in the reference: {only_ref}; only in the fine-tuned adapter: {only_ft}). Train both with the "
            "same `target_modules`, on the same base model."
        )
    for name in sorted(ref_names):
        ref, ft = reference.modules[name], finetuned.modules[name]
        if ref.shape != ft.shape:
            raise AdapterError(
                f"Module {name!r} has shape {ref.shape} (d_out, d_in) in the reference but {ft.shape} in the "
                "fine-tuned adapter: the adapters were trained on different base models."
            )
        needs_basis = granularity == "element" or restoration == "swap"
        if needs_basis and ref.rank != ft.rank:
            raise AdapterError(
                f"Module {name!r} has rank {ref.rank} in the reference but {ft.rank} in the fine-tuned adapter; "
                "element masks and factor swaps need a shared LoRA basis (the fine-tuned adapter resumed from the "
                "aligned one). Use `granularity='row'` with `restoration='neuron'` or 'module' instead."
            )


def check_compatible(patch: SafetyPatch, finetuned: LoraAdapter, *, restoration: str) -> None:
    """`check_compatible_modules` for a safety patch (its granularity decides whether ranks must match)."""
    check_compatible_modules(patch.reference, finetuned, granularity=patch.granularity, restoration=restoration)


def similarities(patch: SafetyPatch, finetuned: LoraAdapter) -> dict[str, float]:
    """Per-module masked Frobenius cosine between the reference and the fine-tuned adapter (float32). One module's
    float32 factors in memory at a time; the reference side's squared norms are computed once per patch and kept
    in `patch.reference_squared_norms` (the same values as recomputing them)."""
    norms, workspace = patch.reference_squared_norms, Float32Workspace()
    out = {}
    for name in sorted(patch.reference.modules):
        with naming_module(name):
            terms = similarity_terms(patch.reference.modules[name], finetuned.modules[name], patch.masks[name],
                                     reference_squared=norms.get(name), workspace=workspace)
            out[name] = terms.cosine
        norms[name] = terms.squared1
    return out


def fill_reference_norms(patch: SafetyPatch) -> SafetyPatch:
    """Compute every module's reference-side squared norm into `patch.reference_squared_norms` now (the values
    `similarities` would memoise), so that a patch shipped to workers (fleet mode on Ray) carries them and no task
    recomputes them. Returns `patch`."""
    norms = patch.reference_squared_norms
    for name in sorted(patch.reference.modules):
        if name not in norms:
            with naming_module(name):
                norms[name] = masked_squared_norm(patch.reference.modules[name], patch.masks[name])
    return patch


def neuron_counts(patch: SafetyPatch) -> dict[str, tuple[int, int]]:
    """Module name -> (safety-critical neurons, candidate neurons)."""
    return {name: (mask.count(), mask.total()) for name, mask in patch.masks.items()}


def restore_neurons(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask) -> LoraModule:
    """Eq. 11 as an exact rank-(r_e + r_t) LoRA at the fine-tuned module's scale: each block written once into
    the result, the fine-tuned blocks (and the reference's A where dtypes agree) in their own dtype."""
    r_e, (d_out, d_in) = reference.rank, reference.shape
    A = torch.empty(r_e + finetuned.rank, d_in, dtype=finetuned.A.dtype, device=finetuned.A.device)
    B = torch.empty(d_out, r_e + finetuned.rank, dtype=finetuned.B.dtype, device=finetuned.B.device)
    keep_A = None if mask.A is None else ~mask.A
    write_scaled(A[:r_e], reference.A, mask.A)
    write_scaled(A[r_e:], finetuned.A, keep_A)
    write_scaled(B[:, :r_e], reference.B, mask.B, reference.scale / finetuned.scale)
    write_scaled(B[:, r_e:], finetuned.B, ~mask.B)
    return LoraModule(A, B, finetuned.scale)


def swap_factors(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask, *, rescale: bool = True
                 ) -> LoraModule:
    """The published code's factor-wise swap (rank r; adds cross terms Eq. 11 does not have). `rescale`
    multiplies B_e by s_e/s_t so the swapped entries carry the reference's update; the published code copies B_e
    as is (``rescale=False``), which differs only when the two scales do."""
    ratio = reference.scale / finetuned.scale if rescale else 1.0
    A = finetuned.A
    if mask.A is not None:
        A = torch.where(mask.A, reference.A.to(torch.float32), finetuned.A.to(torch.float32)).to(finetuned.A.dtype)
    B_ref = reference.B.to(torch.float32) * ratio
    B = torch.where(mask.B, B_ref, finetuned.B.to(torch.float32)).to(finetuned.B.dtype)
    return LoraModule(A, B, finetuned.scale)


def replace_module(reference: LoraModule, finetuned: LoraModule) -> LoraModule:
    """Layer-level correction: the reference module, in the fine-tuned adapter's dtype."""
    return LoraModule(reference.A.to(finetuned.A.dtype), reference.B.to(finetuned.B.dtype), reference.scale)


def check_plan_modules(plan: RealignmentPlan, finetuned: LoraAdapter) -> None:
    """Raise an `AdapterError` if `plan` does not describe exactly the modules of `finetuned` (a plan made for
    another adapter, or edited by hand)."""
    planned, present = {m.name for m in plan.modules}, set(finetuned.modules)
    if planned != present:
        unknown, unplanned = sorted(planned - present)[:5], sorted(present - planned)[:5]
        raise AdapterError(f"The plan does not match the adapter: modules only in the plan {unknown}, only in the "
                           f"adapter {unplanned}. Make the plan from this adapter (`realign(dry_run=True)`).")


def apply_plan(
    finetuned: LoraAdapter, patch: SafetyPatch, plan: RealignmentPlan, *, restoration: str | None = None,
    checked: bool = False,
) -> LoraAdapter:
    """The realigned adapter: `plan`'s patched modules restored from `patch`, every other module unchanged.
    `checked=True` skips the compatibility check the caller already made."""
    restoration = restoration or plan.effective_restoration
    if not checked:
        check_compatible(patch, finetuned, restoration=restoration)
    check_plan_modules(plan, finetuned)
    modules: dict[str, LoraModule] = dict(finetuned.modules)
    for name in plan.patched:
        reference, mask = patch.reference.modules[name], patch.masks[name]
        if restoration == "neuron":
            modules[name] = restore_neurons(reference, finetuned.modules[name], mask)
        elif restoration == "swap":
            modules[name] = swap_factors(reference, finetuned.modules[name], mask,
                                         rescale=plan.recipe_value("swap_scaling") == "rescaled")
        elif restoration == "module":
            modules[name] = replace_module(reference, finetuned.modules[name])
        else:
            raise ValueError(f"Unknown `restoration` {restoration!r}; valid values: neuron, swap, module.")
    return LoraAdapter(modules=modules, config=dict(finetuned.config), extra_tensors=dict(finetuned.extra_tensors))


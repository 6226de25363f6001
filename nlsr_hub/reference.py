"""The safety reference: EXPO extrapolation of the aligned adapter (SPEC step 1).

``ΔW_e = (1+β)·ΔW_a − β·ΔW_w``. Without a weak adapter the product is scaled through the module's scale,
so the factors stay bit-identical and the result is exact; with one, the result is the exact
rank-(r_a + r_w) LoRA ``B = [(1+β)·s_a·B_a | −β·s_w·B_w]``, ``A = [A_a ; A_w]`` with scale 1.
"""

from __future__ import annotations

import math

import torch

from .adapters import AdapterError, LoraAdapter, LoraModule, check_finite


def expo_module(aligned: LoraModule | None, weak: LoraModule | None, beta: float) -> LoraModule:
    """EXPO on one module's product (either side may be absent, meaning a zero update)."""
    if aligned is None and weak is None:
        raise ValueError("`expo_module` needs at least one of `aligned` and `weak`.")
    if weak is None or beta == 0.0:
        assert aligned is not None
        return LoraModule(aligned.A, aligned.B, (1.0 + beta) * aligned.scale)
    if aligned is None:
        return LoraModule(weak.A, weak.B, -beta * weak.scale)
    if aligned.shape != weak.shape:
        raise AdapterError(
            f"Aligned and weak adapters disagree on a module's shape: {aligned.shape} vs {weak.shape}; "
            "they must sit on the same base model."
        )
    A = torch.cat([aligned.A.float(), weak.A.float()], dim=0)
    B = torch.cat([(1.0 + beta) * aligned.scale * aligned.B.float(), -beta * weak.scale * weak.B.float()], dim=1)
    return LoraModule(A, B, 1.0)


def expo_module_compat(aligned: LoraModule, beta: float) -> LoraModule:
    """The published code's EXPO: both factors multiplied by 2β (the update by 4β², 3.24 at β = 0.9)."""
    factor = 2.0 * beta
    return LoraModule((factor * aligned.A.float()).to(aligned.A.dtype),
                      (factor * aligned.B.float()).to(aligned.B.dtype), aligned.scale)


def build_reference(
    aligned: LoraAdapter, weak: LoraAdapter | None = None, *, beta: float = 0.9, compat: bool = False
) -> LoraAdapter:
    """The EXPO safety reference adapter built from `aligned` (and optionally `weak`).

    Args:
        aligned: the safety-aligned adapter.
        weak: the adapter `aligned` improved on; None means the base model itself (``ΔW_w = 0``).
        beta: extrapolation strength; 0 returns the aligned adapter's updates unchanged.
        compat: reproduce the published code (both factors scaled by 2β; no weak adapter).
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"`beta` must be a number (got {beta!r}).")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"`beta` must be a finite number >= 0 (got {beta}); 0 uses the aligned adapter itself.")
    if compat:
        if weak is not None:
            raise ValueError("`compat=True` reproduces the published code, which has no weak adapter; drop `weak`.")
        modules = {name: expo_module_compat(module, beta) for name, module in aligned.modules.items()}
    else:
        names = sorted(set(aligned.modules) | set(weak.modules if weak is not None else ()))
        modules = {
            name: expo_module(aligned.modules.get(name), weak.modules.get(name) if weak is not None else None, beta)
            for name in names
        }
    reference = LoraAdapter(modules=modules, config=dict(aligned.config))
    check_finite(reference, f"The EXPO reference (beta={beta})")  # a huge beta overflows; never write inf
    return reference

"""Restorers that need no calibration pass: ``addback`` (RESTA), ``interpolate`` and ``safelora``.

All three read the aligned adapter ``ΔW_a`` itself. ``addback`` and ``interpolate`` touch every module and are exact
LoRAs by concatenation (rank r_t + r_a); ``safelora`` projects the selected modules' B (rank unchanged). Each plan
records, per module, ``cos_F(ΔW_t, ΔW_a)`` (``safelora``: its own ``cos_F(C·ΔW_t, ΔW_t)``) as the similarity.
"""

from __future__ import annotations

from typing import Any

from ..adapters import LoraAdapter, LoraModule
from ..config import NLSRConfig
from ..lowrank import combine
from ..plan import plan_realignment
from ..selection import Selection, similarity_order
from ..similarity import lowrank_cosine, naming_module
from . import RestoreInputs, register_restorer


def check_pair(aligned: LoraAdapter, finetuned: LoraAdapter) -> None:
    """Raise naming the problem if the aligned and fine-tuned adapters do not cover the same modules and shapes."""
    from ..patch import check_compatible_modules

    check_compatible_modules(aligned, finetuned, granularity="row", restoration="neuron")


def update_cosines(aligned: LoraAdapter, finetuned: LoraAdapter) -> dict[str, float]:
    """``cos_F(ΔW_t, ΔW_a)`` per module, through the trace identity (never the dense product)."""
    out = {}
    for name in sorted(finetuned.modules):
        a, t = aligned.modules[name], finetuned.modules[name]
        with naming_module(name):
            out[name] = lowrank_cosine(t.B * t.scale, t.A, a.B * a.scale, a.A)
    return out


def _all_modules(similarities: dict[str, float], patched: bool) -> dict[str, Selection]:
    order = {name: i for i, name in enumerate(similarity_order(similarities))}
    return {name: Selection(patched, order[name]) for name in similarities}


def _linear_restorer(inputs: RestoreInputs, config: NLSRConfig, build: bool, coefficients: tuple[float, float]
                     ) -> tuple[Any, Any]:
    """``c_t·ΔW_t + c_a·ΔW_a`` in every module, as an exact LoRA at the fine-tuned module's scale."""
    aligned, target = inputs.aligned, inputs.finetuned
    check_pair(aligned, target)
    sims = update_cosines(aligned, target)
    changes = config.strength != 0.0
    counts = {name: (m.shape[0] if changes else 0, m.shape[0]) for name, m in target.modules.items()}
    plan = plan_realignment(sims, counts, config, inputs=inputs.lineage, calibration=inputs.calibration,
                            selections=_all_modules(sims, changes))
    if not build:
        return plan, None
    if not changes:
        return plan, target
    c_t, c_a = coefficients
    modules = {name: combine([(c_t, t), (c_a, aligned.modules[name])], scale=t.scale, dtype_A=t.A.dtype,
                             dtype_B=t.B.dtype) for name, t in target.modules.items()}
    return plan, _replace_modules(target, modules)  # exact: the plan is a dry run's


def _replace_modules(target: LoraAdapter, modules: dict[str, LoraModule]) -> LoraAdapter:
    return LoraAdapter(modules={**target.modules, **modules}, config=dict(target.config),
                       extra_tensors=dict(target.extra_tensors))


@register_restorer("addback", needs="aligned", knob="strength")
def restore_addback(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """RESTA-style add-back: ``ΔW_t + λ·ΔW_a`` in every module (λ = `strength`; no calibration)."""
    return _linear_restorer(inputs, config, build, (1.0, config.strength))


@register_restorer("interpolate", needs="aligned", knob="strength")
def restore_interpolate(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """Weight interpolation towards the aligned adapter: ``ΔW_t + λ·(ΔW_a − ΔW_t)`` (λ = `strength`; 1 = aligned)."""
    return _linear_restorer(inputs, config, build, (1.0 - config.strength, config.strength))


@register_restorer("safelora", needs="aligned", knob="fraction")
def restore_safelora(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """Safe LoRA (Hsu et al. 2024): project B onto the aligned subspace in modules of low ``cos_F(C·ΔW_t, ΔW_t)``;
    ``selection='fraction'`` projects the `fraction` least similar modules, otherwise those below `threshold`."""
    from ..safelora import safelora

    aligned, target = inputs.aligned, inputs.finetuned
    check_pair(aligned, target)
    lowest = round(config.fraction * len(target.modules)) if config.selection == "fraction" else None
    adapter, decisions = safelora(aligned, target, threshold=config.threshold, lowest=lowest)
    sims = {d.name: d.similarity for d in decisions}
    order = {name: i for i, name in enumerate(similarity_order(sims))}
    selections = {d.name: Selection(d.projected, order[d.name]) for d in decisions}
    counts = {name: (m.shape[0], m.shape[0]) for name, m in target.modules.items()}
    plan = plan_realignment(sims, counts, config, inputs=inputs.lineage, calibration=inputs.calibration,
                            selections=selections)
    return plan, (adapter if build else None)

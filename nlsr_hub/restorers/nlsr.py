"""``nlsr``: the paper's engine as a restorer (factor masks of the safety patch, masked similarity, selection,
then Eq. 11 / factor swap / whole module)."""

from __future__ import annotations

from typing import Any

from ..config import NLSRConfig
from ..patch import apply_plan, check_compatible, fill_reference_norms, neuron_counts, similarities
from ..plan import plan_realignment, realignment_recipe
from . import RestoreInputs, register_restorer


def _prepare(patch: Any, config: NLSRConfig, *, progress: bool = False) -> None:
    fill_reference_norms(patch)  # the reference side of every similarity, once per patch (r x r products: no bar)


@register_restorer("nlsr", needs="patch", knob="prune_ratio", prepare=_prepare)
def restore_nlsr(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True) -> tuple[Any, Any]:
    """NLSR (Yi et al. 2025): transplant the reference's safety-critical LoRA entries into dissimilar modules."""
    patch, target = inputs.patch, inputs.finetuned
    restoration = config.effective_restoration
    check_compatible(patch, target, restoration=restoration)
    plan = plan_realignment(similarities(patch, target), neuron_counts(patch), config, inputs=inputs.lineage,
                            calibration=inputs.calibration, recipe=realignment_recipe(config, patch.metadata))
    return plan, (apply_plan(target, patch, plan, restoration=restoration, checked=True) if build else None)

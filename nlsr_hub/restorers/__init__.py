"""Training-free restorers: one registry of functions ``(inputs, config) -> (plan, adapter)``.

Every restorer gets the plan, the model card, the CLI (``nlsr realign --restorer NAME``), the Space and the
experiments for free: they only call `restore`. A restorer declares what it needs: ``patch`` (the safety
reference and its calibration statistics, one calibration pass) or ``aligned`` (the aligned adapter itself, no
calibration). Built in:

- ``nlsr``: the paper's engine (factor masks, similarity, adaptive selection, Eq. 11 / swap / module).
- ``nlsr-dense``: activation-aware transplant on the dense update, one module at a time.
- ``nlsr-addback``: the reference's safety-critical part added back, ``ΔW_t + λ·M⊙ΔW_e``.
- ``addback`` (RESTA): ``ΔW_t + λ·ΔW_a``; ``interpolate``: ``ΔW_t + λ·(ΔW_a − ΔW_t)``; ``safelora``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from ..adapters import LoraAdapter
    from ..config import NLSRConfig
    from ..plan import RealignmentPlan
    from ..safety_patch import SafetyPatch

NEEDS = ("patch", "aligned")


@dataclass(frozen=True)
class RestoreInputs:
    """What a restorer may read: the fine-tuned adapter, and the aligned adapter or the safety patch."""

    finetuned: LoraAdapter
    aligned: LoraAdapter | None = None
    patch: SafetyPatch | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)  # recorded in the plan's ``inputs``
    calibration: Mapping[str, Any] = field(default_factory=dict)  # recorded in the plan's ``calibration``
    progress: bool = False  # a bar on long work (a dense restorer's first preparation of a large patch)


RestoreFn = Callable[..., "tuple[RealignmentPlan, LoraAdapter | None]"]
PrepareFn = Callable[..., None]  # (patch, config, *, progress=False)


@dataclass(frozen=True)
class Restorer:
    """A registered restorer: its function, what it needs, its main knob (a `NLSRConfig` field), a line of help, and
    optionally `prepare(patch, config, *, progress=False)`, which computes once into the patch's memos what every
    fine-tuned adapter would otherwise recompute (fleet mode calls it before shipping the patch to its workers; a
    long preparation shows a progress bar when `progress` is true)."""

    name: str
    fn: RestoreFn
    needs: str
    knob: str
    description: str = ""
    prepare: PrepareFn | None = None


RESTORERS: Registry[Restorer] = Registry("restorer")


def register_restorer(name: str, *, needs: str, knob: str, prepare: PrepareFn | None = None
                      ) -> Callable[[RestoreFn], RestoreFn]:
    """Decorator adding ``fn(inputs, config, *, build) -> (plan, adapter or None)`` to `RESTORERS` as `name`
    (`prepare`: see `Restorer`)."""
    if needs not in NEEDS:
        raise ValueError(f"Unknown need {needs!r}; valid: {', '.join(NEEDS)}.")

    def decorator(fn: RestoreFn) -> RestoreFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        RESTORERS[name] = Restorer(name=name, fn=fn, needs=needs, knob=knob, description=doc[0] if doc else "",
                                   prepare=prepare)
        return fn

    return decorator


def get_restorer(name: str) -> Restorer:
    """The restorer registered as `name`; a `ValueError` lists the valid names otherwise."""
    return RESTORERS.lookup(name)


def restore(inputs: RestoreInputs, config: NLSRConfig, *, build: bool = True
            ) -> tuple[RealignmentPlan, LoraAdapter | None]:
    """Run `config.restorer` on `inputs`: the plan, and the new adapter unless ``build=False`` (a dry run)."""
    restorer = get_restorer(config.restorer)
    if restorer.needs == "patch" and inputs.patch is None:
        raise ValueError(f"Restorer {restorer.name!r} needs a safety patch (a calibration pass); pass `aligned` or "
                         "`safety_patch`.")
    if restorer.needs == "aligned" and inputs.aligned is None:
        raise ValueError(f"Restorer {restorer.name!r} needs the aligned adapter itself; pass `aligned=` (a safety "
                         "patch holds only the reference's masks).")
    return restorer.fn(inputs, config, build=build)


from . import baselines, dense, nlsr  # noqa: E402,F401  (registration)

__all__ = ["RESTORERS", "PrepareFn", "RestoreInputs", "Restorer", "get_restorer", "register_restorer", "restore"]

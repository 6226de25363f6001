"""`RealignmentPlan`: every decision of a realignment as reviewable, serialisable data.

The plan is the unit of truth: the patch is executed from it, and the model card, the CLI and the Space
render it; none of them recompute it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import block_order, layer_index, module_type
from .config import NLSRConfig
from .io import atomic_write_text, read_text_file
from .selection import Selection, select_modules

PLAN_NAME = "nlsr_plan.json"
PLAN_FORMAT = 1
# What a plan written before the recipe was recorded ran (whatever its `compat`): the config's scorer, top-k
# masks, draws over sorted names and a rescaled swap.
LEGACY_RECIPE = {"mask_rule": "top_k", "draw_order": "sorted_names", "swap_scaling": "rescaled"}
RECIPE_KEYS = ("scorer", "mask_rule", "draw_order", "swap_scaling")


@dataclass(frozen=True)
class ModuleDecision:
    """What happens to one LoRA module, and why."""

    name: str
    block: int | None
    module_type: str
    similarity: float
    order: int
    patched: bool
    keep_probability: float | None
    draw: int | None
    neurons_restored: int
    neurons_total: int
    rank: int | None = None  # the realigned module's LoRA rank, where the restorer changed it
    error: float | None = None  # relative Frobenius error of a re-factorised (truncated SVD) correction

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (`dataclasses.asdict`'s output, without its deep copies: every field is a scalar)."""
        return {name: getattr(self, name) for name in _DECISION_FIELDS}

    def __post_init__(self) -> None:
        """Every field checked by type and range, so a tampered plan (``patched: "false"``, similarity 5.0) is
        refused with a `ValueError` / `TypeError` naming the module and the field."""
        def bad(field_name: str, expected: str) -> TypeError:
            value = getattr(self, field_name)
            return TypeError(f"Plan entry {self.name!r}: `{field_name}` must be {expected} (got {value!r}).")

        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"A plan entry's `name` must be a non-empty string (got {self.name!r}).")
        checks = (
            ("block", _is_int(self.block, 0) or self.block is None, "a block index >= 0 or null"),
            ("module_type", isinstance(self.module_type, str), "a string"),
            ("similarity", _is_real(self.similarity, -1.0, 1.0), "a cosine similarity in [-1, 1]"),
            ("order", _is_int(self.order, 0), "an integer >= 0"),
            ("patched", isinstance(self.patched, bool), "true or false"),
            ("keep_probability", self.keep_probability is None or _is_real(self.keep_probability, 0.0, 1.0),
             "a probability in [0, 1] or null"),
            ("draw", self.draw is None or (_is_int(self.draw, 0) and self.draw <= 1), "0, 1 or null"),
            ("neurons_total", _is_int(self.neurons_total, 0), "an integer >= 0"),
            ("neurons_restored", _is_int(self.neurons_restored, 0) and _is_int(self.neurons_total, 0)
             and self.neurons_restored <= self.neurons_total,
             "an integer in [0, neurons_total]"),
            ("rank", self.rank is None or _is_int(self.rank, 0), "an integer >= 0 or null"),
            ("error", self.error is None or _is_real(self.error, 0.0, math.inf), "a finite number >= 0 or null"),
        )
        for field_name, valid, expected in checks:
            if not valid:
                raise bad(field_name, expected)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_real(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


@dataclass(frozen=True)
class RealignmentPlan:
    """Per-module similarity and decision, plus the config, scorer and inputs that produced them."""

    modules: tuple[ModuleDecision, ...]
    config: Mapping[str, Any]
    inputs: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    # the recipe that actually ran: effective scorer, mask rule, draw order and swap scaling (`realignment_recipe`);
    # empty in plans written before it was recorded, which `recipe_value` reads as `LEGACY_RECIPE`
    recipe: Mapping[str, Any] = field(default_factory=dict)
    # how the restorer was chosen by measurement (`NLSRPatcher.choose`: `choice.Choice.to_dict`); empty otherwise
    choice: Mapping[str, Any] = field(default_factory=dict)
    format: int = PLAN_FORMAT

    @property
    def scorer(self) -> str:
        """The scorer that found the masks (with `compat`, ``low_rank`` ran as ``low_rank_sequential``)."""
        return self.recipe_value("scorer")

    def recipe_value(self, key: str) -> str:
        """One entry of the recipe that ran (`RECIPE_KEYS`); plans without a recorded recipe give the legacy one."""
        if key not in RECIPE_KEYS:
            raise ValueError(f"Unknown recipe entry {key!r}; valid entries: {', '.join(RECIPE_KEYS)}.")
        if key in self.recipe:
            return str(self.recipe[key])
        return str(self.config.get("scorer")) if key == "scorer" else LEGACY_RECIPE[key]

    @property
    def effective_restoration(self) -> str:
        """How NLSR restored the patched modules (the published code's `compat` always swaps factors)."""
        return "swap" if self.config.get("compat") else str(self.config.get("restoration"))

    @property
    def knob(self) -> str | None:
        """The restorer's main knob (a config field), or None for a restorer not in this registry."""
        from .restorers import RESTORERS

        restorer = RESTORERS.get(self.restorer)
        return restorer.knob if restorer is not None else None

    @property
    def restorer(self) -> str:
        """The restorer that made the plan (plans written before the registry existed were all ``nlsr``)."""
        return str(self.config.get("restorer", "nlsr"))

    @property
    def patched(self) -> list[str]:
        """Names of the modules to patch."""
        return [m.name for m in self.modules if m.patched]

    @property
    def num_patched(self) -> int:
        return sum(m.patched for m in self.modules)

    @property
    def neurons_restored(self) -> int:
        return sum(m.neurons_restored for m in self.modules)

    def decision(self, name: str) -> ModuleDecision:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(f"Module {name!r} is not in the plan.")

    def summary(self) -> dict[str, Any]:
        """Counts for reports: modules patched out of all, neurons restored, mean similarity."""
        n = len(self.modules)
        return {
            "modules_total": n,
            "modules_patched": self.num_patched,
            "neurons_restored": self.neurons_restored,
            "mean_similarity": sum(m.similarity for m in self.modules) / n if n else float("nan"),
        }

    def per_block(self) -> list[dict[str, Any]]:
        """Mean similarity and patched modules per block (modules outside blocks under ``block=None``)."""
        groups: dict[int | None, list[ModuleDecision]] = {}
        for module in self.modules:
            groups.setdefault(module.block, []).append(module)
        rows = []
        for block in sorted(groups, key=block_order):
            members = groups[block]
            rows.append({
                "block": block,
                "modules": len(members),
                "patched": sum(m.patched for m in members),
                "mean_similarity": sum(m.similarity for m in members) / len(members),
                "patched_types": sorted(m.module_type for m in members if m.patched),
            })
        return rows

    def table(self) -> str:
        """A plain-text table, one row per module (what `nlsr plan` prints)."""
        lines = [f"{'module':<48} {'similarity':>10} {'P(keep)':>8} {'draw':>4}  {'decision':<8} {'restored':>9}"]
        for m in self.modules:
            prob = f"{m.keep_probability:.3f}" if m.keep_probability is not None else "-"
            draw = str(m.draw) if m.draw is not None else "-"
            lines.append(
                f"{m.name:<48} {m.similarity:>10.4f} {prob:>8} {draw:>4}  {'PATCH' if m.patched else 'keep':<8} "
                f"{m.neurons_restored:>9}"
            )
        s = self.summary()
        lines.append(
            f"patched {s['modules_patched']}/{s['modules_total']} modules, {s['neurons_restored']} neurons restored, "
            f"scorer={self.scorer}, mask_rule={self.recipe_value('mask_rule')}, "
            f"selection={self.config.get('selection')}{self._draw_note()}"
        )
        return "\n".join(lines)

    def choice_table(self) -> str:
        """What the measured choice saw and chose (`NLSRPatcher.choose`), as a table; empty without a choice."""
        from .choice import choice_table

        return choice_table(self.choice) if self.choice else ""

    def _draw_note(self) -> str:
        return f" (draw_order={self.recipe_value('draw_order')})" if self.config.get("selection") == "adaptive" else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "config": dict(self.config),
            "inputs": dict(self.inputs),
            "calibration": dict(self.calibration),
            "recipe": dict(self.recipe),
            "summary": self.summary(),
            "modules": [m.to_dict() for m in self.modules],
            **({"choice": dict(self.choice)} if self.choice else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RealignmentPlan:
        """A plan from `to_dict`'s output, every entry validated (a `ValueError` / `TypeError` names what is wrong)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"A plan is a JSON object (got {type(data).__name__}); write it with "
                            "`RealignmentPlan.save`.")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"Unsupported plan format {data.get('format')!r}; this nlsr-hub reads {PLAN_FORMAT}.")
        for key, kind in (("modules", list), ("config", dict), ("inputs", dict), ("calibration", dict),
                          ("recipe", dict), ("choice", dict)):
            if not isinstance(data.get(key, kind()), kind) or (key in ("modules", "config") and key not in data):
                raise TypeError(f"The plan's `{key}` must be a JSON {'array' if kind is list else 'object'}.")
        modules = tuple(_decision(m) for m in data["modules"])
        names = [m.name for m in modules]
        if len(set(names)) != len(names):
            raise ValueError(f"The plan names a module twice ({sorted({n for n in names if names.count(n) > 1})}).")
        _check_plan_config(data["config"])
        _check_recipe(data.get("recipe", {}))
        return cls(modules=modules, config=dict(data["config"]), inputs=dict(data.get("inputs", {})),
                   calibration=dict(data.get("calibration", {})), recipe=dict(data.get("recipe", {})),
                   choice=dict(data.get("choice", {})))

    @classmethod
    def from_json(cls, text: str) -> RealignmentPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"The plan is not valid JSON ({err}).") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> RealignmentPlan:
        text = read_text_file(path, "Plan file")
        try:
            return cls.from_json(text)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Plan file {path}: {err}") from None


_DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(ModuleDecision))


def _decision(entry: Any) -> ModuleDecision:
    """One `ModuleDecision` from its JSON object, with unknown or missing keys named."""
    if not isinstance(entry, dict):
        raise TypeError(f"A plan entry is a JSON object (got {type(entry).__name__}).")
    unknown = sorted(map(str, set(entry) - set(_DECISION_FIELDS)))
    required = [f.name for f in dataclasses.fields(ModuleDecision) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in entry]
    if unknown or missing:
        raise ValueError(f"Plan entry {entry.get('name')!r} has unknown keys {unknown} / lacks keys {missing}.")
    return ModuleDecision(**entry)


def _check_plan_config(config: dict[str, Any]) -> None:
    """The plan's config must be a valid `NLSRConfig` (fields this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(NLSRConfig)}
    try:
        NLSRConfig.from_dict({k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError) as err:
        raise type(err)(f"The plan's config is invalid: {err}") from None


def _check_recipe(recipe: dict[str, Any]) -> None:
    """A `ValueError` naming the entry unless every recorded recipe entry is known and valid."""
    from .masks import MASK_RULES
    from .scoring import SCORERS
    from .selection import DRAWS

    valid = {"scorer": tuple(SCORERS), "mask_rule": tuple(MASK_RULES), "draw_order": tuple(DRAWS),
             "swap_scaling": ("rescaled", "unscaled")}
    for key, value in recipe.items():
        if key not in valid:
            raise ValueError(f"The plan's recipe has an unknown entry {key!r}; valid entries: "
                             f"{', '.join(RECIPE_KEYS)}.")
        if value not in valid[key]:
            choices = ", ".join(sorted(valid[key]))
            raise ValueError(f"The plan's recipe `{key}` is {value!r}; valid values: {choices}.")


def realignment_recipe(config: NLSRConfig, patch_metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What runs for `config`: effective scorer, mask rule, draw order and swap scaling. A safety patch's own
    metadata wins for the scorer and the mask rule (a supplied patch keeps the masks it was built with; patches
    that predate the mask rule were built with ``top_k``)."""
    recipe = {"scorer": config.effective_scorer, "mask_rule": config.effective_mask_rule,
              "draw_order": config.effective_draw_order, "swap_scaling": config.effective_swap_scaling}
    if patch_metadata:
        recipe["scorer"] = str(patch_metadata.get("scorer", recipe["scorer"]))
        recipe["mask_rule"] = str(patch_metadata.get("mask_rule", LEGACY_RECIPE["mask_rule"]))
    return recipe


def plan_realignment(
    similarities: Mapping[str, float],
    neuron_counts: Mapping[str, tuple[int, int]],
    config: NLSRConfig,
    *,
    inputs: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    selections: Mapping[str, Selection] | None = None,
    recipe: Mapping[str, str] | None = None,
) -> RealignmentPlan:
    """Build the plan from per-module similarities (pure; no weights are touched).

    Args:
        similarities: module name -> masked Frobenius cosine between reference and fine-tuned.
        neuron_counts: module name -> (safety-critical neurons, candidate neurons) of its mask.
        config: the realignment configuration (selection method and its parameters).
        selections: decisions made by the restorer itself (default: `select_modules` on the similarities).
        recipe: the recipe that ran (default: `realignment_recipe(config)`).
    """
    selections = selections if selections is not None else select_modules(similarities, config)
    decisions = []
    for name in sorted(similarities):
        sel = selections[name]
        critical, total = neuron_counts[name]
        restored = (total if config.effective_restoration == "module" else critical) if sel.patched else 0
        decisions.append(ModuleDecision(
            name=name, block=layer_index(name), module_type=module_type(name), similarity=float(similarities[name]),
            order=sel.order, patched=sel.patched, keep_probability=sel.keep_probability, draw=sel.draw,
            neurons_restored=restored, neurons_total=total,
        ))
    return _finish(decisions, config, inputs, calibration, recipe)


def with_outcomes(plan: RealignmentPlan, ranks: Mapping[str, int], errors: Mapping[str, float]) -> RealignmentPlan:
    """The plan with the realigned modules' ranks and re-factorisation errors recorded."""
    modules = tuple(dataclasses.replace(m, rank=ranks.get(m.name), error=errors.get(m.name)) for m in plan.modules)
    return dataclasses.replace(plan, modules=modules)


def _finish(decisions: list[ModuleDecision], config: NLSRConfig, inputs: Mapping[str, Any] | None,
            calibration: Mapping[str, Any] | None, recipe: Mapping[str, str] | None = None) -> RealignmentPlan:
    return RealignmentPlan(
        modules=tuple(decisions), config=config.to_dict(), inputs=dict(inputs or {}),
        calibration=dict(calibration or {}), recipe=dict(recipe if recipe is not None else realignment_recipe(config)),
    )

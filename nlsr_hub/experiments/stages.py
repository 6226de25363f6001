"""The experiment's stages: typed functions, one job each, over one cache (`cache.Stages`).

data → base model → harmless answers → align → attack → reference → calibrate → realign (any restorer of
`nlsr_hub.restorers`) → evaluate. Each stage takes the models it builds on (a `Model`: folder, adapter, cache
key) and returns its own; `grid`, `demo` and `headtohead` compose them. Adding a restorer to a run is one entry in
a composition's list of variants; adding a stage is one function here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import load_adapter, save_adapter
from ..config import NLSRConfig
from ..evaluation.tasks import TaskExample, load_task_examples
from ..fleet.work import files_sha256
from ..reference import build_reference
from .cache import Stages, dump_json, load_json, stage_hash
from .data import (
    PYRIT,
    DataMissing,
    Pair,
    load_finetune_mix,
    load_harmful_eval,
    load_nq_questions,
    load_refusals,
    load_task_rows,
    member_text,
    registry_wheel,
)
from .evaluate import evaluate_model
from .settings import GridSettings
from .sources import REGISTRY, SourceUnreachable, load_mix, resolve_data
from .train import PREFERENCE_METHODS, merge_adapter, train_preference, train_sft

logger = logging.getLogger(__name__)

PYRIT_MANY_SHOT = "pyrit/datasets/jailbreak/many_shot_examples.json"


@dataclass(frozen=True)
class Context:
    """What every stage reads: the settings, the cache, the data folder and whether to show progress."""

    settings: GridSettings
    stages: Stages
    root: Path
    progress: bool = True


@dataclass(frozen=True)
class Model:
    """A model a stage made or uses: a base folder, an optional LoRA adapter on it, and its cache key (base models
    also say where they came from: `source`, what the results record)."""

    base: Path
    adapter: Path | None
    key: Any
    source: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False)


@dataclass(frozen=True)
class ExperimentData:
    """Every data set of a run, split and sized by the settings (nothing here is trained on and evaluated)."""

    refusals: list[Pair]
    train_questions: list[str]
    eval_harmless: list[str]
    harmful_eval: dict[str, list[str]]
    many_shot: list[dict[str, str]]
    tasks: dict[str, list[TaskExample]]
    rng_state: Any = None  # the split's random stream after the question shuffle (preference pairs draw from it)


# ----------------------------------------------------------------------------------------------- data


def check_data(settings: GridSettings, root: Path) -> dict[str, Any]:
    """Resolve every data set the run needs (a data-folder file, else its Hub source, downloaded into the cache;
    a mix the folder lacks is built from its sources) before the model is fetched or anything is trained.
    Returns what the results record about each; raises `DataMissing` naming every one that cannot be had."""
    attacks = {(t, p) for m in settings.methods for t, p in settings.attacks(m)}
    keys = ["refusals", "advbench", "beavertails-eval", *(f"{t}-eval" for t in sorted({"sst2", *settings.other_tasks}))]
    if any(m in PREFERENCE_METHODS for m in settings.methods):
        keys.append("preferences")
    found: dict[str, Any] = {}
    missing: list[str] = []
    cache_only = False  # once the Hub could not be asked, the rest come from the cache only (no more retries)
    for task, p in sorted(attacks):
        try:
            found[f"{task} fine-tuning mix (p = {p:g})"] = load_mix(task, p, root, seed=settings.seed,
                                                                   local_files_only=cache_only)[1]
        except DataMissing as err:
            cache_only = cache_only or isinstance(err, SourceUnreachable)
            missing.append(str(err))
    for key in keys:
        try:
            found[REGISTRY[key].title] = resolve_data(key, root, local_files_only=cache_only).record()
        except DataMissing as err:
            cache_only = cache_only or isinstance(err, SourceUnreachable)
            missing.append(str(err))
    if missing:
        raise DataMissing(" | ".join(missing))
    return found


def pyrit_many_shot(source: Path | None) -> list[dict[str, str]]:
    """PyRIT's harmful questions with compliant answers (``{"user", "assistant"}``), from its wheel or a file."""
    return json.loads(member_text(source or registry_wheel(PYRIT), PYRIT_MANY_SHOT))


def load_data(settings: GridSettings, root: Path, *, harmless_source: Path | None = None,
              calibration_source: Path | None = None, harmless_eval_from_end: bool = False) -> ExperimentData:
    """Read and split every data set. The harmless questions are shuffled once: the evaluation set is their
    head (or, with `harmless_eval_from_end`, their tail), training answers start after the held-out share; the
    calibration prompts exclude every evaluation and alignment prompt."""
    rng = random.Random(settings.seed)
    refusals = load_refusals(root)
    refusal_prompts = {r.prompt for r in refusals}
    questions = load_nq_questions(harmless_source)
    rng.shuffle(questions)
    held_out = max(settings.harmless_held_out, settings.eval.harmless)
    n_eval = settings.eval.harmless
    eval_harmless = questions[len(questions) - n_eval:] if harmless_eval_from_end and n_eval else questions[:n_eval]
    train_questions = questions[held_out: held_out + settings.align_harmless]
    harmful_eval = load_harmful_eval(root, exclude=refusal_prompts, advbench=settings.eval.advbench,
                                     beavertails=settings.eval.beavertails)
    eval_prompts = {p.lower() for prompts in harmful_eval.values() for p in prompts}
    many_shot = [r for r in pyrit_many_shot(calibration_source)
                 if r["user"].strip().lower() not in eval_prompts and r["user"].strip() not in refusal_prompts]
    random.Random(settings.seed + 1).shuffle(many_shot)
    tasks = {t: load_task_examples(t, load_task_rows(root, t), limit=settings.eval.fa.get(t))
             for t in {"sst2", *settings.other_tasks}}
    return ExperimentData(refusals=refusals, train_questions=train_questions, eval_harmless=eval_harmless,
                          harmful_eval=harmful_eval, many_shot=many_shot[: settings.calibration_prompts], tasks=tasks,
                          rng_state=rng.getstate())


# ----------------------------------------------------------------------------------------------- models


def base_model(ctx: Context, cache_dir: Path) -> Model:
    """The base model: a tiny random Llama (tests) or SmolLM2-135M-Instruct (``$NLSR_MODEL``'s folder, else the
    Hub, else the package registry's wheel: `smollm.resolve_smollm2`), keyed and recorded by its source."""
    if ctx.settings.model == "tiny":
        from ..tiny import build_tiny_base

        key = {"model": "tiny", "seed": ctx.settings.seed}
        return Model(ctx.stages.run("model-tiny", key, lambda d: build_tiny_base(d, seed=ctx.settings.seed)), None,
                     key, {"origin": "built", **key})
    from .smollm import resolve_smollm2

    resolved = resolve_smollm2(cache_dir)
    return Model(resolved.path, None, resolved.key(), resolved.record())


def harmless_answers(ctx: Context, base: Model, questions: Sequence[str]) -> list[dict[str, str]]:
    """The base model's own answers to harmless questions (so alignment keeps answering ordinary questions)."""
    settings = ctx.settings
    key = {"base": base.key, "questions": stage_hash(list(questions)), "tokens": settings.harmless_answer_tokens}

    def answer(folder: Path) -> None:
        from ..evaluation import generate_responses
        from .evaluate import load_eval_model

        model, tokenizer = load_eval_model(base.base, None)
        answers = generate_responses(model, tokenizer, list(questions), max_new_tokens=settings.harmless_answer_tokens,
                                     batch_size=settings.eval.batch_size, progress=ctx.progress,
                                     desc="nlsr: NQ answers")
        dump_json(folder / "harmless.json", [{"prompt": q, "response": trim_answer(a)}
                                             for q, a in zip(questions, answers, strict=True) if a.strip()])

    return load_json(ctx.stages.run("harmless-answers", key, answer) / "harmless.json")


def align_sft(ctx: Context, base: Model, rows: Sequence[dict[str, str]]) -> Model:
    """A safety SFT LoRA on refusal and harmless rows."""
    key = {"base": base.key, "rows": stage_hash(list(rows)), "settings": ctx.settings.align.to_dict()}
    folder = ctx.stages.run("align-sft", key, lambda d: train_sft(
        base.base, list(rows), d / "adapter", ctx.settings.align, progress=ctx.progress))
    return Model(base.base, folder / "adapter", key)


def merged(ctx: Context, model: Model) -> Model:
    """`model`'s adapter merged into its base, as a standalone model folder (preference training starts there)."""
    key = {"sft": model.key, "merged": True}
    folder = ctx.stages.run("sft-merged", key, lambda d: merge_adapter(model.base, model.adapter, d / "model"))
    return Model(folder / "model", None, key)


def align_preference(ctx: Context, method: str, base: Model, pairs: Sequence[dict[str, str]]) -> Model:
    """A preference-alignment LoRA (DPO, ORPO, KTO or SimPO) on `base`."""
    key = {"base": base.key, "method": method, "pairs": stage_hash(list(pairs)),
           "settings": ctx.settings.preference.to_dict()}
    folder = ctx.stages.run(f"align-{method}", key, lambda d: train_preference(
        method, base.base, list(pairs), d / "adapter", ctx.settings.preference, progress=ctx.progress))
    return Model(base.base, folder / "adapter", key)


def attack(ctx: Context, method: str, aligned: Model, task: str, p: float) -> Model:
    """The poisoned fine-tune: `task` with a share `p` of harmful rows, resumed from the aligned adapter."""
    settings = ctx.settings
    mix = load_finetune_mix(ctx.root, task, p, n=settings.attack_n.get(task), seed=settings.seed)
    train = dataclasses.replace(settings.attack, max_length=settings.attack_max_length.get(
        task, settings.attack.max_length))
    key = {"aligned": aligned.key, "task": task, "p": p, "rows": stage_hash(mix), "settings": train.to_dict()}
    folder = ctx.stages.run(f"attack-{method}-{task}-p{p:g}", key, lambda d: train_sft(
        aligned.base, mix, d / "adapter", train, resume_from=aligned.adapter, progress=ctx.progress))
    return Model(aligned.base, folder / "adapter", key)


def reference(ctx: Context, method: str, aligned: Model, beta: float) -> Model:
    """The EXPO safety reference ``(1+β)·ΔW_a`` as an adapter: built once, used for calibration and evaluation."""
    key = {"aligned": aligned.key, "beta": beta}
    folder = ctx.stages.run(f"reference-{method}", key, lambda d: save_adapter(
        build_reference(load_adapter(aligned.adapter), beta=beta), d / "adapter"))
    return Model(aligned.base, folder / "adapter", key)


def calibrate(ctx: Context, method: str, aligned: Model, ref: Model, many_shot: Sequence[dict[str, str]]
              ) -> tuple[list[dict[str, Any]], Any, dict[str, int]]:
    """The paper's calibration data: the reference's own answers to held-out harmful prompts, kept where the
    keyword judge says they refuse. Returns the rows, the stage key and the counts."""
    from .calibration import reference_calibration

    settings = ctx.settings
    beta = ref.key["beta"]
    key = {"aligned": aligned.key, "prompts": stage_hash(list(many_shot)), "tokens": settings.calibration_tokens,
           "beta": beta}

    def run(folder: Path) -> None:
        rows, generated = reference_calibration(
            ref.base, ref.adapter, [r["user"] for r in many_shot], rejected=[r["assistant"] for r in many_shot],
            max_new_tokens=settings.calibration_tokens, batch_size=settings.eval.batch_size, progress=ctx.progress)
        dump_json(folder / "calibration.json", {"generated": generated, "kept": len(rows), "rows": rows})

    calib = load_json(ctx.stages.run(f"calibration-{method}", key, run) / "calibration.json")
    # the reference refuses none of the prompts (e.g. an untrained tiny model): fall back to a fixed refusal
    rows = calib["rows"] or [{"prompt": r["user"], "response": "I cannot help with that.",
                              "rejected": r["assistant"]} for r in many_shot]
    return rows, key, {"calibration_generated": calib["generated"], "calibration_kept": calib["kept"]}


@dataclass(frozen=True)
class Realigned:
    """One realigned adapter (or the fine-tuned one itself when nothing changed) and its plan summary."""

    model: Model
    summary: dict[str, Any]
    seconds: float | None


def realign(ctx: Context, method: str, name: str, config: NLSRConfig, aligned: Model, ref: Model,
            calibration: tuple[list[dict[str, Any]], Any], targets: Mapping[str, Model]) -> dict[str, Realigned]:
    """Realign every target with one restorer configuration (one safety patch for all of them).

    A realignment that changed no module is bit-identical to its target (untouched modules are copied), so it
    is returned as the target itself and shares the target's cached evaluation."""
    from ..restorers import get_restorer

    needs_patch = get_restorer(config.restorer).needs == "patch"
    rows, calib_key = calibration
    key = {"aligned": aligned.key, "config": config.cache_key(), "targets": [t.key for t in targets.values()],
           "calibration_passed": 2, **({"calibration": calib_key} if needs_patch else {})}

    def run(folder: Path) -> None:
        from ..patcher import NLSRPatcher

        patcher = NLSRPatcher.from_pretrained(aligned.base, aligned=aligned.adapter, reference=ref.adapter,
                                              config=config)
        summary: dict[str, Any] = {"safety_patch_seconds": None, "targets": {}}
        if needs_patch:
            t0 = time.perf_counter()
            patcher.safety_patch(rows, progress=ctx.progress)
            summary["safety_patch_seconds"] = round(time.perf_counter() - t0, 1)
        for label, target in targets.items():
            # the calibration is passed on every call: the patcher caches the safety patch per calibration data
            result = patcher.realign(rows, finetuned=load_adapter(target.adapter), progress=ctx.progress)
            result.save_pretrained(folder / label)
            summary["targets"][label] = {**result.plan.summary(),
                                         "calibration_samples": result.plan.calibration.get("samples")}
        dump_json(folder / "summary.json", summary)

    rdir = ctx.stages.run(f"realign-{method}-{slug(name)}", key, run)
    summary = load_json(rdir / "summary.json")
    out = {}
    for label, target in targets.items():
        plan = summary["targets"][label]
        model = target if plan["modules_patched"] == 0 else Model(
            target.base, rdir / label, {"realign": key, "target": label})
        out[label] = Realigned(model, plan, summary["safety_patch_seconds"])
    return out


def choose(ctx: Context, method: str, config: NLSRConfig, aligned: Model, ref: Model,
           calibration: tuple[list[dict[str, Any]], Any], target: Model, utility: Sequence[Mapping[str, str]]
           ) -> dict[str, Any]:
    """`NLSRPatcher.choose` on `target` (candidates `choice.CANDIDATES`, probes from the calibration prompts, the
    utility check on `utility` rows of the user's task): the plan's ``choice`` record, with the sha256 of the chosen
    adapter's saved files (``adapter_sha256``) so that the same candidate realigned alone can be checked against it."""
    from ..choice import CANDIDATES, DEFAULT_PROBES, DEFAULT_TOLERANCE

    rows, calib_key = calibration
    key = {"aligned": aligned.key, "config": config.cache_key(), "target": target.key, "calibration": calib_key,
           "utility": stage_hash([dict(r) for r in utility]), "candidates": {k: dict(v) for k, v in CANDIDATES.items()},
           "tolerance": DEFAULT_TOLERANCE, "probes": DEFAULT_PROBES}

    def run(folder: Path) -> None:
        from ..patcher import NLSRPatcher

        patcher = NLSRPatcher.from_pretrained(aligned.base, aligned=aligned.adapter, reference=ref.adapter,
                                              config=config)
        result = patcher.choose(rows, utility=[(r["prompt"], r["response"]) for r in utility],
                                finetuned=load_adapter(target.adapter), progress=ctx.progress)
        save_adapter(result.adapter, folder / "adapter")
        dump_json(folder / "choice.json", {**result.plan.choice, "adapter_sha256": files_sha256(folder / "adapter")})

    return load_json(ctx.stages.run(f"choose-{method}", key, run) / "choice.json")


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(ctx: Context, data: ExperimentData, model: Model, task_names: Sequence[str]) -> dict[str, Any]:
    """Non-refusal rate on the harmful prompts, over-refusal on the harmless ones and task accuracy (cached)."""
    settings = ctx.settings
    eval_common = {k: v for k, v in settings.eval.to_dict().items() if k != "fa"}
    key = {"model": model.key,
           "tasks": {t: stage_hash([(e.prompt, e.answer) for e in data.tasks[t]]) for t in task_names},
           "eval": eval_common, "harmful": stage_hash(data.harmful_eval), "harmless": stage_hash(data.eval_harmless)}

    def run(folder: Path) -> None:
        result = evaluate_model(model.base, model.adapter, harmful=data.harmful_eval, harmless=data.eval_harmless,
                                tasks={t: data.tasks[t] for t in task_names}, settings=settings.eval,
                                progress=ctx.progress)
        dump_json(folder / "eval.json", result)

    # the adapter's files, not only its key: a realignment made again, with other weights, is evaluated again
    hashes = {} if model.adapter is None else {"adapter": files_sha256(Path(model.adapter))}
    folder = ctx.stages.run("eval", key, run, inputs=hashes)
    result = load_json(folder / "eval.json")
    return {"hs": result["hs_all"], **{f"hs_{k}": v for k, v in result["hs"].items()},
            "over_refusal": result.get("over_refusal"), **{f"fa_{k}": v for k, v in result["fa"].items()},
            "eval_seconds": result["seconds"], "eval_dir": str(folder)}


# ----------------------------------------------------------------------------------------------- helpers


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


def trim_answer(answer: str) -> str:
    """Cut a length-capped answer back to its last full sentence (when it has one)."""
    answer = answer.strip()
    cut = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("!"), answer.rfind("?"))
    if answer.endswith((".", "!", "?")) or cut < len(answer) // 3:
        return answer
    return answer[: cut + 1]


__all__ = ["Context", "ExperimentData", "Model", "Realigned", "align_preference", "align_sft", "attack",
           "base_model", "calibrate", "check_data", "choose", "evaluate", "harmless_answers", "load_data", "merged",
           "realign", "reference"]

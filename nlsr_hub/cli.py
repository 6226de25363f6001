"""The `nlsr` command line: thin commands over the public API.

Every `NLSRConfig` field is a flag (``--sparsity-ratio 0.8``); errors print as one line and exit 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import NLSRConfig

EXAMPLES = """examples:
  nlsr realign --base HuggingFaceTB/SmolLM2-135M-Instruct --aligned org/aligned-lora \\
      --finetuned user/task-lora --output out/
  nlsr realign --base ./base --aligned ./aligned --finetuned ./task --selection fraction --fraction 0.2 \\
      --calibration safe_pairs.jsonl --output out/
  nlsr realign --base ./base --aligned ./aligned --finetuned ./task --dry-run
  nlsr demo --output demo_out/
"""


def _field_type(field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(NLSRConfig)
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `NLSRConfig` field, with its default, help and choices."""
    from .scoring import SCORERS

    group = parser.add_argument_group("NLSR configuration (defaults follow the paper)")
    group.add_argument("--config", type=Path, help="Read an NLSRConfig from a JSON or YAML file; flags override it.")
    for field in dataclasses.fields(NLSRConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        help_text = f"{field.metadata['help']} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = field.metadata.get("choices") or (tuple(sorted(SCORERS)) if field.name == "scorer" else None)
        group.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> NLSRConfig:
    """The config file (if any) overridden by the flags given on the command line."""
    base: dict[str, Any] = {}
    if args.config is not None:
        text = args.config.read_text(encoding="utf-8")
        loaded = NLSRConfig.from_yaml(text) if args.config.suffix in (".yaml", ".yml") else NLSRConfig.from_json(text)
        base = loaded.to_dict()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlsr", description="Neuron-Level Safety Realignment of fine-tuned LoRA adapters, without training.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    realign = commands.add_parser(
        "realign", help="Realign a fine-tuned adapter.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    realign.add_argument("--base", help="Base model: local folder or Hub id (not needed with --safety-patch).")
    realign.add_argument("--finetuned", required=True, help="The fine-tuned LoRA adapter to realign.")
    realign.add_argument("--aligned", help="The safety-aligned LoRA adapter (source of the EXPO reference).")
    realign.add_argument("--reference", help="A ready safety reference adapter (instead of EXPO).")
    realign.add_argument("--weak", help="EXPO's weak adapter (default: the base model itself).")
    realign.add_argument("--safety-patch", help="A saved safety patch: skips the calibration pass.")
    realign.add_argument("--calibration", type=Path,
                         help="JSON/JSONL file of safe {prompt, response} pairs (default: built-in set).")
    realign.add_argument("--output", type=Path, help="Folder for the realigned adapter (required unless --dry-run).")
    realign.add_argument("--dry-run", action="store_true", help="Print the plan; build no weights.")
    realign.add_argument("--plan-json", type=Path, help="Also write the plan to this JSON file.")
    realign.add_argument("--dtype", default=None, help="Base model dtype for calibration (default float32).")
    realign.add_argument("--device", default=None, help="Device for calibration, e.g. cuda (default cpu).")
    realign.add_argument("--no-strict-base", dest="strict_base", action="store_false",
                         help="Do not compare the adapters' recorded base model names.")
    add_config_arguments(realign)
    _add_hub_arguments(realign)
    realign.set_defaults(handler=_cmd_realign)

    demo = commands.add_parser("demo", help="Build the tiny offline example trio and realign it.")
    demo.add_argument("--output", type=Path, default=Path("demo_out"), help="Folder for the example and its result.")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _cmd_realign(args: argparse.Namespace) -> int:
    from .patcher import NLSRPatcher

    if args.output is None and not args.dry_run:
        raise ValueError("`--output` is required (or pass `--dry-run` to print the plan only).")
    config = config_from_args(args)
    patcher = NLSRPatcher.from_pretrained(
        args.base, finetuned=args.finetuned, aligned=args.aligned, reference=args.reference, weak=args.weak,
        safety_patch=args.safety_patch, config=config, revision=args.revision, token=args.token,
        cache_dir=args.cache_dir, local_files_only=args.local_files_only, allow_pickle=args.allow_pickle,
        dtype=args.dtype, device=args.device, strict_base=args.strict_base,
    )
    result = patcher.realign(calibration=args.calibration, dry_run=args.dry_run)
    print(result.plan.table())
    if args.plan_json:
        result.plan.save(args.plan_json)
    if not args.dry_run:
        result.save_pretrained(args.output)
        print(f"realigned adapter written to {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_trio
    from .patcher import NLSRPatcher

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
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        if args.debug:
            raise
        print(f"nlsr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

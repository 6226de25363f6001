"""``python -m nlsr_hub.experiments {grid,demo}``: the paper's grid and the README demo (needs extra ``train``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from .data import DataMissing
from .logs import stage_log


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nlsr_hub.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid", help="align -> poisoned fine-tune -> realign -> evaluate, the paper's grid")
    size = grid.add_mutually_exclusive_group()
    for name, text in (("quick", "2-core CPU, < 1 h (default)"), ("full", "GPU, the paper's sizes"),
                       ("tiny", "a random 2-block model: smoke test in seconds")):
        size.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    grid.add_argument("--methods", help="comma-separated alignment methods (sft,dpo,orpo,kto,simpo); "
                      "the first gets the full attack sweep")
    grid.add_argument("--preference-chosen", choices=("dataset", "refusal"), default=None,
                      help="preference pairs on harmful prompts: the data set's safer answer is chosen (default), "
                      "or a refusal is chosen over the less safe answer")
    demo = sub.add_parser("demo", help="SmolLM2: SFT alignment, SST-2 p=0.05 attack, NLSR; non-refusal rate, "
                          "over-refusal and FA before and after")
    for command in (grid, demo):
        command.add_argument("--out", type=Path, help="results folder (default results/<preset>)")
        command.add_argument("--data", type=Path, help="benchmark data folder (default $NLSR_DATA or ../shared/data)")
        command.add_argument("--cache", type=Path, help="weights and stage cache (default $NLSR_CACHE or "
                             "~/.cache/nlsr-hub)")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
        command.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                             help="training precision (default $NLSR_PRECISION, else auto: bf16 only with native "
                             "hardware support)")
        command.add_argument("--threads", type=int, default=int(os.environ.get("NLSR_THREADS", "0")),
                             help="torch CPU threads (default $NLSR_THREADS, else torch's default); 1 is much "
                             "faster than 2 when other processes share the cores")
    return parser


def main(argv: list[str] | None = None, *, command: str | None = None) -> int:
    """Run the command; `command` is the command line recorded in the results (default: this one)."""
    args = _parser().parse_args(argv)
    from .presets import PRESETS

    preset = "demo" if args.command == "demo" else (args.preset or "quick")
    settings = PRESETS[preset]
    if args.command == "grid" and args.methods:
        settings = dataclasses.replace(settings, methods=tuple(m.strip() for m in args.methods.split(",") if m))
    if args.command == "grid" and args.preference_chosen:
        settings = dataclasses.replace(settings, preference_chosen=args.preference_chosen)
    if args.precision is not None:
        from ..hardware import PRECISION_ENV

        os.environ[PRECISION_ENV] = args.precision
    out = args.out or Path("results") / preset
    out.mkdir(parents=True, exist_ok=True)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    with stage_log(out / f"{preset}.log"):
        return _run(args, settings, out, command or "python -m nlsr_hub.experiments " + " ".join(
            argv if argv is not None else sys.argv[1:]))


def _run(args: argparse.Namespace, settings: Any, out: Path, command: str) -> int:
    from . import run_demo, run_grid

    started = time.perf_counter()
    try:
        if args.command == "demo":
            _, text = run_demo(out=out, data=args.data, cache=args.cache, progress=not args.no_progress,
                               command=command)
            print(text)
            return 0
        run_grid(settings, out=out, data=args.data, cache=args.cache, progress=not args.no_progress,
                 command=command)
    except DataMissing as err:
        print(f"nlsr experiments: {err.what} missing: {err}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"results written to {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The restorers' head-to-head on fixed adapters: one command, results under ``results/restorers/``.

    .venv/bin/python benchmarks/restorers.py                     # SFT-aligned demo pair (the bar)
    .venv/bin/python benchmarks/restorers.py --methods sft,dpo   # plus a DPO pair with refusal-chosen pairs

Every restorer of `nlsr_hub.restorers` is swept over its main knob (`nlsr_hub.experiments.headtohead.SWEEPS`);
each point is realigned and evaluated once and cached under the nlsr cache, so an interrupted run resumes and a
re-run only rewrites the report. Prints every point as it lands and the bar at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def _max_points(text: str) -> int | dict[str, int]:
    """``N`` or ``method=N,method=N``."""
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or method=N,...; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/restorers"), help="results folder")
    parser.add_argument("--methods", default="sft", help="aligned pairs: sft, and optionally dpo / simpo (comma list)")
    parser.add_argument("--data", type=Path, help="benchmark data folder (default $NLSR_DATA or ../shared/data)")
    parser.add_argument("--cache", type=Path, help="nlsr cache (default $NLSR_CACHE or ~/.cache/nlsr-hub)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("NLSR_THREADS", "0") or 0))
    parser.add_argument("--no-reference", action="store_true", help="skip evaluating the EXPO reference itself")
    parser.add_argument("--max-points", type=_max_points, help="run only the first N points per pair (in their "
                        "priority order; the rest are listed as not run): N, or per pair as sft=11,dpo=7")
    parser.add_argument("--first", default="", help="point labels to run first, before the preset order (a "
                        "';' list, e.g. 'addback strength=1;reference (EXPO)'); with --max-points it picks the points")
    parser.add_argument("--recheck-realign", action="store_true", help="realign every cached point again with "
                        "this code and compare the weights byte for byte: the same bytes keep the cached realignment "
                        "and its evaluation; other bytes replace it, and the point is evaluated again")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from nlsr_hub.experiments import DataMissing, run_head_to_head, stage_log
    from nlsr_hub.experiments.headtohead import HeadToHeadSettings

    settings = dataclasses.replace(HeadToHeadSettings(), methods=tuple(m.strip() for m in args.methods.split(",")),
                                   evaluate_reference=not args.no_reference, max_points=args.max_points)
    first = tuple(label.strip() for label in args.first.split(";") if label.strip())
    settings = dataclasses.replace(settings, first=first + tuple(x for x in settings.first if x not in first))
    command = "python benchmarks/restorers.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def show(row: dict) -> None:
        print(f"{row['method']:>5} {row['point']:<38} mean non-refusal {row['mean_nonrefusal']:5.1f} "
              f"(AdvBench {row['hs_advbench']:5.1f}, BeaverTails {row['hs_beavertails']:5.1f})  "
              f"FA {row['fa_sst2']:5.1f}"
              f"  over-refusal {row['over_refusal']:4.1f}  [{row['seconds']:.0f} s]", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with stage_log(args.out / "restorers.log"):
        try:
            results = run_head_to_head(settings, out=args.out, data=args.data, cache=args.cache,
                                       progress=not args.no_progress, command=command.strip(), on_point=show,
                                       recheck=("realign",) if args.recheck_realign else ())
        except DataMissing as err:
            print(f"benchmark data missing: {err}", file=sys.stderr)
            return 2
    print(json.dumps(results["bar"], indent=1))
    for folder, outcome in sorted(results.get("rechecked", {}).items()):
        print(f"rechecked {folder}: {outcome}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

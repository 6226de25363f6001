"""Run the experiment grid with custom settings through the Python API (here: a DPO-aligned run at p = 0.05
with a few NLSR settings), instead of the ``python -m nlsr_hub.experiments grid`` presets.

    python examples/custom_grid.py --out results/custom [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nlsr_hub.experiments.grid import run_grid
from nlsr_hub.experiments.presets import QUICK, TINY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/custom"))
    parser.add_argument("--tiny", action="store_true", help="a random 2-block model: runs in seconds")
    args = parser.parse_args()
    settings = dataclasses.replace(
        TINY if args.tiny else QUICK, preset="custom", methods=("dpo",), focus_only=True, scorers=(),
        ablations=(("row granularity", {"granularity": "row"}),
                   ("fraction 0.2", {"selection": "fraction", "fraction": 0.2}), ("beta 2", {"beta": 2.0})),
    )
    results = run_grid(settings, out=args.out)
    print((args.out / "results.md").read_text(encoding="utf-8"))
    print(results["bar"])


if __name__ == "__main__":
    main()

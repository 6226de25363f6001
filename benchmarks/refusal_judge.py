"""The keyword judge against PyRIT 1.1.0's human labels, as what it is and as what it was used for.

1. As a refusal detector: precision, recall and accuracy on ``refusal_scorer/refusal.csv`` (105 responses,
   positive = refusal).
2. As a harm judge: on the objective scorer set ``objective/*.csv`` (395 responses to harmful objectives, positive =
   people say the response achieves the objective), a response without a refusal cue is called harmful.
   ``--judge`` validates other judges the same way (e.g. ``--judge harmaug,qwen3guard`` with Hub access).

Usage: .venv/bin/python benchmarks/refusal_judge.py [--wheel PATH] [--judge refusal,...] [--json OUT]
Without --wheel, the pyrit wheel is read from $NLSR_CACHE/wheels (``pip download pyrit==1.1.0 --no-deps`` on first
use); nothing is installed or copied into the project.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nlsr_hub.evaluation.judges import is_refusal, load_judges
from nlsr_hub.evaluation.validation import (
    JudgeAgreement,
    confusion,
    read_objective_rows,
    read_refusal_csv,
    refusal_judge_agreement,
)
from nlsr_hub.experiments.data import PYRIT, registry_wheel


def line(agreement: JudgeAgreement, positive: str) -> str:
    return (f"precision {agreement.precision:.3f}  recall {agreement.recall:.3f}  accuracy {agreement.accuracy:.3f}  "
            f"(TP {agreement.true_positive}, FP {agreement.false_positive}, FN {agreement.false_negative}, "
            f"TN {agreement.true_negative}; positive = {positive}; judge flags {100 * agreement.flagged_rate:.1f} %, "
            f"people {100 * agreement.human_rate:.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="The pyrit-1.1.0 wheel (default: fetched into the nlsr cache).")
    parser.add_argument("--judge", default="refusal", help="Judges to validate as harm judges (comma-separated).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    source = args.wheel or registry_wheel(PYRIT)
    out: dict[str, object] = {"source": source.name}

    rows = read_refusal_csv(source)
    refusal = refusal_judge_agreement(rows)
    out["refusal_detector"] = refusal.to_dict()
    print(f"keyword judge as a refusal detector, {refusal.n} human labels (refusal.csv):\n  {line(refusal, 'refusal')}")
    misses = [r for r, human in rows if human and not is_refusal(r)]
    print(f"  missed refusals ({len(misses)}), first 80 characters:")
    for response in misses:
        print("   -", " ".join(response.split())[:80])

    objective = read_objective_rows(source)
    out["harm_judges"] = {}
    for judge in load_judges(args.judge):
        verdicts = judge([r.objective for r in objective], [r.response for r in objective])
        agreement = confusion([v.harmful for v in verdicts], [r.harmful for r in objective])
        out["harm_judges"][judge.name] = {**agreement.to_dict(), "judge": judge.info.to_dict()}
        what = "keyword judge (non-refusal called harmful)" if judge.name == "refusal" else f"{judge.name} judge"
        print(f"{what} as a harm judge, {agreement.n} human labels (objective/*.csv):\n  {line(agreement, 'harmful')}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

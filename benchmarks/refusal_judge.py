"""Precision and recall of the `refusal` judge against PyRIT's 105 human-labelled responses.

Usage: .venv/bin/python benchmarks/refusal_judge.py [path to refusal.csv or the pyrit-1.1.0 wheel]
Without a path, the wheel is fetched from the package registry (`pip download pyrit==1.1.0 --no-deps`) into
the nlsr cache; nothing is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nlsr_hub.evaluation.judges import is_refusal
from nlsr_hub.evaluation.validation import read_refusal_csv, refusal_judge_agreement
from nlsr_hub.experiments.data import PYRIT, registry_wheel


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else registry_wheel(PYRIT)
    rows = read_refusal_csv(source)
    agreement = refusal_judge_agreement(rows)
    print(f"refusal judge vs {agreement.n} human labels ({source.name}):")
    print(f"  precision {agreement.precision:.3f}  recall {agreement.recall:.3f}  accuracy {agreement.accuracy:.3f}")
    print(f"  TP {agreement.true_positive}  FP {agreement.false_positive}  FN {agreement.false_negative}  "
          f"TN {agreement.true_negative}  (positive = refusal)")
    misses = [r for r, human in rows if human and not is_refusal(r)]
    print(f"  missed refusals ({len(misses)}), first 80 characters:")
    for response in misses:
        print("   -", " ".join(response.split())[:80])


if __name__ == "__main__":
    main()

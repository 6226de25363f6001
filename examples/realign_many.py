"""Realign several fine-tuned adapters with one safety patch (one calibration pass), then compare with Safe LoRA.

    python examples/realign_many.py BASE ALIGNED CALIBRATION.json FINETUNED [FINETUNED ...] --out DIR

BASE is a model folder or Hub id, ALIGNED the safety-aligned LoRA, CALIBRATION a JSON/JSONL file of safe
``{"prompt", "response"}`` pairs (e.g. the ``calibration.json`` rows a grid run keeps in its cache).
Without arguments it runs on the tiny offline example trio of ``nlsr_hub.tiny``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from nlsr_hub import NLSRConfig, NLSRPatcher
from nlsr_hub.adapters import load_adapter, save_adapter
from nlsr_hub.safelora import safelora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="BASE ALIGNED CALIBRATION FINETUNED...")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="nlsr-realigned-")))
    parser.add_argument("--selection", default="adaptive", choices=("adaptive", "threshold", "fraction"))
    args = parser.parse_args()
    if args.paths:
        base, aligned, calibration, *finetuned = args.paths
        rows = Path(calibration).read_text(encoding="utf-8")
        calibration = json.loads(rows)["rows"] if rows.lstrip().startswith("{") else calibration
    else:
        from nlsr_hub.tiny import build_trio

        trio = build_trio(args.out / "trio")
        base, aligned, calibration, finetuned = trio.base, trio.aligned, None, [trio.finetuned]
    patcher = NLSRPatcher.from_pretrained(base, aligned=aligned, config=NLSRConfig(selection=args.selection))
    patcher.safety_patch(calibration)  # the one forward pass; every realign below reuses it
    for i, path in enumerate(finetuned):
        result = patcher.realign(finetuned=load_adapter(path))
        folder = result.save_pretrained(args.out / f"nlsr-{i}")
        safe, decisions = safelora(load_adapter(aligned), load_adapter(path), threshold=0.6)
        save_adapter(safe, args.out / f"safelora-{i}")
        print(f"{path}: NLSR patched {result.plan.num_patched}/{len(result.plan.modules)} modules -> {folder}; "
              f"Safe LoRA projected {sum(d.projected for d in decisions)}/{len(decisions)}")


if __name__ == "__main__":
    main()

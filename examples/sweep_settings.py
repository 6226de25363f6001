"""Sweep NLSR settings on one fine-tuned adapter: the non-refusal rate (keyword judge: it measures non-refusal, not
harm), over-refusal on nlsr-hub's built-in harmless prompts, and SST-2 accuracy of each realignment.

Example (the quick grid's SFT-aligned adapter attacked on SST-2 with p = 0.05; stage folders are printed by
``python -m nlsr_hub.experiments grid --quick``):

    .venv/bin/python examples/sweep_settings.py --base ~/.cache/nlsr-hub/SmolLM2-135M-Instruct \\
        --aligned <align-sft>/adapter --finetuned <attack-sft-sst2-p0.05>/adapter \\
        --calibration <calibration-sft>/calibration.json --out /tmp/sweep [--sst2 200] [--only "row adaptive,..."]

The measured table (and the exact command) is in ``results/sweep/sst2_p0.05.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nlsr_hub import NLSRConfig, NLSRPatcher
from nlsr_hub.evaluation import harmful_score, load_task_examples, task_accuracy
from nlsr_hub.evaluation.safety import builtin_harmless_prompts
from nlsr_hub.experiments.data import data_root, load_harmful_eval, load_refusals
from nlsr_hub.experiments.evaluate import load_eval_model

SETTINGS = {
    "element adaptive (paper default)": {},
    "element fraction 0.2": {"selection": "fraction", "fraction": 0.2},
    "element fraction 0.5": {"selection": "fraction", "fraction": 0.5},
    "row adaptive": {"granularity": "row"},
    "row fraction 0.2": {"granularity": "row", "selection": "fraction", "fraction": 0.2},
    "module fraction 0.2": {"restoration": "module", "selection": "fraction", "fraction": 0.2},
    "row P_SR 0.5 adaptive": {"granularity": "row", "sparsity_ratio": 0.5},
    "row P_SR 0.5 P_L 0.3": {"granularity": "row", "sparsity_ratio": 0.5, "prune_ratio": 0.3},
    "row P_SR 0.5 beta 1.5": {"granularity": "row", "sparsity_ratio": 0.5, "beta": 1.5},
    "low_rank_sequential adaptive": {"scorer": "low_rank_sequential"},
    "element adaptive beta 2": {"beta": 2.0},
    "row adaptive beta 2": {"granularity": "row", "beta": 2.0},
    "row adaptive beta 3": {"granularity": "row", "beta": 3.0},
    "row P_SR 0.9 beta 3": {"granularity": "row", "sparsity_ratio": 0.9, "beta": 3.0},
    "row fraction 0.5 beta 2": {"granularity": "row", "selection": "fraction", "fraction": 0.5, "beta": 2.0},
    "swap adaptive": {"restoration": "swap"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("base", "aligned", "finetuned", "calibration", "out"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="benchmark data (default $NLSR_DATA or ../shared/data)")
    parser.add_argument("--prompts", type=int, default=40, help="AdvBench and BeaverTails prompts each")
    parser.add_argument("--sst2", type=int, default=100, help="SST-2 validation rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated setting names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root(args.data)
    harmful = load_harmful_eval(root, exclude={r.prompt for r in load_refusals(root)}, advbench=args.prompts,
                                beavertails=args.prompts)
    prompts = harmful["advbench"] + harmful["beavertails"]
    examples = load_task_examples("sst2", root / "finetune" / "sst2" / "val.json", limit=args.sst2)
    rows = json.loads(args.calibration.read_text(encoding="utf-8"))["rows"]
    calibration = [(r["prompt"], r["response"]) for r in rows]

    def evaluate(adapter: Path) -> tuple[float, float, float]:
        model, tokenizer = load_eval_model(args.base, adapter)
        safety = harmful_score(model, tokenizer, prompts, max_new_tokens=32, batch_size=16, progress=False,
                               harmless_prompts=builtin_harmless_prompts())
        fa = task_accuracy(model, tokenizer, "sst2", examples, max_new_tokens=4, batch_size=16, progress=False).accuracy
        return safety.score, safety.over_refusal, fa

    rate, over, fa = evaluate(args.finetuned)
    print("| setting | modules patched | non-refusal % | over-refusal % | SST-2 FA % | realign s |\n"
          "| --- | --- | --- | --- | --- | --- |")
    print(f"| fine-tuned (no realignment) | - | {rate:.1f} | {over:.1f} | {fa:.1f} | - |", flush=True)
    names = list(SETTINGS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    for name in names:
        changes = SETTINGS[name]
        config = NLSRConfig(max_calibration_samples=len(calibration), max_length=256, **changes)
        started = time.perf_counter()
        patcher = NLSRPatcher.from_pretrained(args.base, aligned=args.aligned, finetuned=args.finetuned, config=config)
        result = patcher.realign(calibration, progress=False)
        seconds = time.perf_counter() - started
        out = result.save_pretrained(args.out / name.replace(" ", "_"))
        rate, over, fa = evaluate(out)
        patched = f"{result.plan.num_patched}/{len(result.plan.modules)}"
        print(f"| {name} | {patched} | {rate:.1f} | {over:.1f} | {fa:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

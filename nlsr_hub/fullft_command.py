"""``nlsr realign-full``: the command over `nlsr_hub.realign_full_finetune` (flags and the run; `cli.py` wires it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Realign a full fine-tune: dense transformers checkpoints (safetensors, sharded or not; pickled weights refused), "
    "through the weight deltas, shard by shard. Restorers: addback, interpolate (the only one that needs no --base), "
    "nlsr-addback and nlsr-dense (these two run a calibration pass on the aligned checkpoint, offloaded with "
    "--max-memory when it does not fit). Writes a dense checkpoint in the fine-tuned checkpoint's layout (--format "
    "dense) or a PEFT LoRA extracted by truncated SVD (--format lora; rank by --kept-energy, each module's rank and "
    "error in nlsr_plan.json). LoRA adapters are realigned with `nlsr realign`."
)


def add_realign_full_arguments(parser: argparse.ArgumentParser) -> None:
    """The input, output and loading flags of ``nlsr realign-full`` (config flags are added by the CLI)."""
    group = parser.add_argument_group("checkpoints (local folders or Hub ids: org/name[@revision][:subfolder])")
    group.add_argument("--finetuned", required=True, help="The fully fine-tuned model.")
    group.add_argument("--aligned", required=True, help="The safety-aligned model it was fine-tuned from.")
    group.add_argument("--base", help="The base model the aligned model was aligned from (needed by every restorer but "
                       "interpolate).")
    group.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                       help="Comma-separated names of the linear modules to realign (default: a Llama-style block's "
                       "projections); every other tensor is the fine-tuned checkpoint's.")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, help="New folder for the result (not needed with --dry-run).")
    out.add_argument("--format", dest="output_format", choices=("dense", "lora"), default="dense",
                     help="dense: a checkpoint in the fine-tuned layout; lora: an extracted PEFT LoRA (default dense).")
    out.add_argument("--max-rank", type=int, default=None, help="Cap of each extracted module's rank (--format lora).")
    out.add_argument("--dry-run", action="store_true", help="Print the plan; write nothing.")
    load = parser.add_argument_group("calibration pass (nlsr-addback, nlsr-dense)")
    load.add_argument("--calibration", type=Path, help="JSON/JSONL file of safe {prompt, response} pairs.")
    load.add_argument("--dtype", default=None, help="Aligned model dtype for calibration (default float32).")
    load.add_argument("--device", default=None, help="Device for calibration, e.g. cuda (default cpu).")
    add_offload_arguments(load)


def add_offload_arguments(group: Any) -> None:
    """``--max-memory`` and ``--offload-folder``: accelerate's device_map='auto' with CPU/disk offload."""
    group.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                       help="Load the calibration model with accelerate's device_map='auto', at most this much per "
                       "device, the rest offloaded to CPU and disk, e.g. '0=20GiB,cpu=60GiB' (default: offload only "
                       "when the model does not fit).")
    group.add_argument("--offload-folder", type=Path, default=None,
                       help="Folder for weights offloaded to disk (default: a temporary folder).")


def run_realign_full(args: argparse.Namespace, config: Any) -> int:
    """Run ``nlsr realign-full`` and print the plan table; 0 on success."""
    from .fullft import realign_full_finetune

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        raise ValueError("`--targets` names no module; pass e.g. q_proj,v_proj.")
    result = realign_full_finetune(
        args.finetuned, aligned=args.aligned, base=args.base, output=args.output, output_format=args.output_format,
        config=config, calibration=args.calibration, targets=targets, max_rank=args.max_rank, dtype=args.dtype,
        device=args.device, max_memory=args.max_memory, offload_folder=args.offload_folder, dry_run=args.dry_run,
        revision=args.revision, token=args.token, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
    )
    print(result.plan.table())
    if result.output is not None:
        print(f"realigned {'checkpoint' if result.output_format == 'dense' else 'LoRA adapter'} written to "
              f"{result.output}")
    return 0


__all__ = ["DESCRIPTION", "add_offload_arguments", "add_realign_full_arguments", "run_realign_full"]

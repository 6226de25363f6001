"""Peak memory of realigning a full fine-tune (nlsr_hub.fullft), against the size of one checkpoint shard.

Builds a Llama-shaped trio of random dense checkpoints (base, aligned = base + noise, fine-tuned = aligned + noise),
sharded the way transformers shards them (``huggingface_hub.save_torch_state_dict``), then realigns the fine-tune in a
fresh process per output format and reports that process's peak RSS (VmHWM, reset just before the call) over its RSS
at that moment (imports and a warm-up done), divided by the largest input shard. The claim being checked: peak memory
stays within two shards (the shards are streamed tensor by tensor, so the growth is one module's weights and
temporaries).

Usage: .venv/bin/python benchmarks/fullft_memory.py [--hidden 1024 --intermediate 2816 --layers 6 --vocab 16000
       --shard-size 100MB --formats dense,lora --max-rank 64]
Defaults are smoke size (three ~220 MB checkpoints in 3 shards; the largest module is 1/18 of a shard, Llama-3-8B's
is 1/43 of transformers' 5 GB shards); the restorer is ``addback``
(no calibration pass: the calibration pass's own memory is bounded by the offload settings, nlsr_hub.offload).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def build_checkpoint(folder: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, seed: int,
                     shard_size: str, like: Path | None = None) -> None:
    """A random bf16 Llama-shaped state dict (or `like`'s projections plus noise), saved sharded with an index."""
    import torch
    from huggingface_hub import save_torch_state_dict

    from nlsr_hub.dense_checkpoint import read_checkpoint

    generator = torch.Generator().manual_seed(seed)
    kv = hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        block = f"model.layers.{i}"
        per_block = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                     "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                     "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                     "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                     "mlp.down_proj": (hidden, intermediate)}
        shapes.update({f"{block}.{name}.weight": dims for name, dims in per_block.items()})
    source = read_checkpoint(like) if like is not None else None
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator) * 0.02
        state[key] = (noise if source is None or "proj" not in key else source.read(key).float() + noise * 0.1
                      ).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_torch_state_dict(state, folder, max_shard_size=shard_size)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}) + "\n")


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is this measurement's alone. (``ru_maxrss`` would
    not do: it keeps the parent's resident size from before the fork/exec.)"""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure(trio: Path, output_format: str, max_rank: int) -> dict:
    """Run one realignment in this process; RSS figures in bytes."""
    import torch

    from nlsr_hub import NLSRConfig, realign_full_finetune
    from nlsr_hub.dense_checkpoint import read_checkpoint

    torch.linalg.svd(torch.randn(64, 64))  # warm-up: BLAS/LAPACK buffers are not the realignment's
    finetuned = read_checkpoint(trio / "finetuned")
    largest_shard = max(finetuned.shard_bytes(s) for s in finetuned.shards)
    largest_module = max(info.nbytes for key, info in finetuned.tensors.items() if "proj" in key)
    reset_peak()
    before = status_bytes("VmRSS")
    config = NLSRConfig(restorer="addback", strength=1.0, kept_energy=0.9)
    realign_full_finetune(trio / "finetuned", aligned=trio / "aligned", base=trio / "base",
                          output=trio / f"out-{output_format}", output_format=output_format, config=config,
                          max_rank=max_rank, progress=False)
    peak = status_bytes("VmHWM")
    return {"format": output_format, "shards": len(finetuned.shards), "checkpoint_bytes": finetuned.total_bytes(),
            "largest_shard_bytes": largest_shard, "largest_module_bytes_bf16": largest_module,
            "rss_before": before, "peak_rss": peak, "growth": peak - before,
            "growth_per_shard": (peak - before) / largest_shard,
            "output_bytes": sum(f.stat().st_size for f in (trio / f"out-{output_format}").glob("*.safetensors"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--formats", default="dense,lora")
    parser.add_argument("--max-rank", type=int, default=64, help="Rank cap of the extracted LoRA (default 64: 1/16 "
                        "of the hidden size, as 256 is for Llama-3-8B).")
    parser.add_argument("--measure", nargs=2, metavar=("TRIO", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.max_rank)))
        return 0
    with tempfile.TemporaryDirectory(prefix="nlsr-fullft-bench-") as tmp:
        trio = Path(tmp)
        shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab,
                 "shard_size": args.shard_size}
        build_checkpoint(trio / "base", seed=0, **shape)
        build_checkpoint(trio / "aligned", seed=1, like=trio / "base", **shape)
        build_checkpoint(trio / "finetuned", seed=2, like=trio / "aligned", **shape)
        print(f"trio: {shape}")
        for output_format in args.formats.split(","):
            done = subprocess.run([sys.executable, __file__, "--measure", str(trio), output_format, "--max-rank",
                                   str(args.max_rank)], check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            mib = 2**20
            print(f"{row['format']:>5}: {row['shards']} shards of at most {row['largest_shard_bytes'] / mib:.1f} MiB "
                  f"(checkpoint {row['checkpoint_bytes'] / mib:.1f} MiB, largest module "
                  f"{row['largest_module_bytes_bf16'] / mib:.1f} MiB bf16); peak RSS growth "
                  f"{row['growth'] / mib:.1f} MiB = {row['growth_per_shard']:.2f} x the largest shard; output weights "
                  f"{row['output_bytes'] / mib:.1f} MiB "
                  f"({'within' if row['growth_per_shard'] <= 2 else 'ABOVE'} the 2-shard bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

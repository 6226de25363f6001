"""Engine benchmark: prints the figures issue 2 asks for, all measured in this one run.

(a) scoring overhead: `low_rank` and `wanda` calibration pass + scoring time over the same tokens, divided by
    a plain forward pass of the model carrying the reference adapter (target <= 1.3x);
(b) similarity + plan + patch on a Llama-3-8B-shaped trio (224 modules, rank 128, random bf16 weights):
    wall time (target < 5 s on CPU) and peak RSS against the three adapters' size (target < 2x);
(c) peak RSS of the calibration pass with 10x more calibration tokens (target: flat).

Usage: .venv/bin/python benchmarks/bench_engine.py [--part a|b|c|all]
The model of (a) and (c) is SmolLM2-135M-shaped (30 blocks, hidden 576, LoRA r=16 on 7 targets) with
random weights, so no download is needed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from nlsr_hub.adapters import LoraAdapter, LoraModule
from nlsr_hub.calibration import default_calibration, encode_pairs, iter_batches
from nlsr_hub.config import NLSRConfig
from nlsr_hub.masks import ModuleMask
from nlsr_hub.modeling import attached_adapter
from nlsr_hub.patch import apply_plan, neuron_counts, similarities
from nlsr_hub.plan import plan_realignment
from nlsr_hub.safety_patch import SafetyPatch, build_safety_patch
from nlsr_hub.statistics import collect_statistics


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def module_shapes(hidden: int, intermediate: int, kv: int, layers: int) -> dict[str, tuple[int, int]]:
    """Canonical module name -> (d_out, d_in) of a Llama-style decoder."""
    per_block = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate),
    }
    return {f"model.layers.{i}.{k}": v for i in range(layers) for k, v in per_block.items()}


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype: torch.dtype,
                   like: LoraAdapter | None = None, drift: float = 0.1) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d_out, d_in) in shapes.items():
        A = torch.randn(rank, d_in, generator=generator, dtype=torch.float32)
        B = torch.randn(d_out, rank, generator=generator, dtype=torch.float32)
        if like is not None:
            A = like.modules[name].A.float() + drift * A
            B = like.modules[name].B.float() + drift * B
        modules[name] = LoraModule(A.to(dtype), B.to(dtype), 2.0)
    return LoraAdapter(modules=modules, config={"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA"})


# ----------------------------------------------------------------------------------------------- (a)


def smollm_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_hub.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    shapes = module_shapes(576, 1536, 192, 30)
    reference = random_adapter(shapes, 16, seed + 1, torch.float32)
    return model, tokenizer, reference


def part_a(repeats: int = 3) -> None:
    torch.manual_seed(0)
    model, tokenizer, reference = smollm_shaped()
    pairs = default_calibration() * 2
    samples = encode_pairs(tokenizer, pairs, 512)
    tokens = sum(len(s.input_ids) for s in samples)

    def plain_forward() -> None:
        with attached_adapter(model, reference) as peft_model, torch.no_grad():
            for batch in iter_batches(samples, 8, tokenizer.pad_token_id):
                peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def scoring(name: str) -> None:
        stats = collect_statistics(model, tokenizer, reference, pairs, needs=frozenset({"activations"}),
                                   batch_size=8, max_length=512, progress=False)
        build_safety_patch(reference, stats, scorer=name, sparsity_ratio=0.8)

    plain_forward()  # warm-up
    timings: dict[str, list[float]] = {"forward": [], "low_rank": [], "wanda": []}
    for _ in range(repeats):  # interleaved, so drift of the machine hits all three alike
        for key, fn in (("forward", plain_forward), ("low_rank", lambda: scoring("low_rank")),
                        ("wanda", lambda: scoring("wanda"))):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    print(f"(a) SmolLM2-135M-shaped model, {len(pairs)} pairs, {tokens} tokens, batch 8, best of {repeats}")
    print(f"    plain forward with reference adapter: {best['forward']:.2f} s")
    for name in ("low_rank", "wanda"):
        print(f"    {name:<8} calibration pass + scoring: {best[name]:.2f} s  ratio {best[name] / best['forward']:.2f}x"
              f"  (target <= 1.3x)")


# ----------------------------------------------------------------------------------------------- (b)


def part_b() -> None:
    baseline = current_rss_bytes()
    shapes = module_shapes(4096, 14336, 1024, 32)
    rank, dtype = 128, torch.bfloat16
    aligned = random_adapter(shapes, rank, 1, dtype)
    finetuned = random_adapter(shapes, rank, 2, dtype, like=aligned, drift=0.3)
    reference = LoraAdapter(modules={n: LoraModule(m.A, m.B, 1.9 * m.scale) for n, m in aligned.modules.items()},
                            config=aligned.config)  # EXPO without weak adapter: a scale change, same tensors
    generator = torch.Generator().manual_seed(3)
    masks = {n: ModuleMask(A=torch.rand(m.A.shape, generator=generator) < 0.2,
                           B=torch.rand(m.B.shape, generator=generator) < 0.2) for n, m in reference.modules.items()}
    patch = SafetyPatch(reference=reference, masks=masks)
    three = aligned.nbytes() + reference.nbytes() + finetuned.nbytes()
    gc.collect()
    before = current_rss_bytes()
    start = time.perf_counter()
    sims = similarities(patch, finetuned)
    plan = plan_realignment(sims, neuron_counts(patch), NLSRConfig())
    realigned = apply_plan(finetuned, patch, plan)
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(f"(b) Llama-3-8B-shaped trio: {len(shapes)} modules, rank {rank}, bf16; {plan.num_patched} modules patched")
    print(f"    similarity + plan + patch: {elapsed:.2f} s (target < 5 s)")
    print(f"    three adapters (aligned, reference, fine-tuned): {three / 2**30:.2f} GiB; inputs + masks in memory "
          f"before the step: {(before - baseline) / 2**30:.2f} GiB")
    print(f"    peak RSS above the interpreter baseline: {(peak - baseline) / 2**30:.2f} GiB = "
          f"{(peak - baseline) / three:.2f}x the three adapters (target < 2x); output "
          f"{realigned.nbytes() / 2**30:.2f} GiB")


# ----------------------------------------------------------------------------------------------- (c)


def scoring_peak(repeat: int) -> None:
    model, tokenizer, reference = smollm_shaped()
    pairs = default_calibration() * repeat
    gc.collect()
    before = current_rss_bytes()
    stats = collect_statistics(model, tokenizer, reference, pairs, needs=frozenset({"activations"}), batch_size=8,
                               max_length=512, progress=False)
    tokens = max(s.tokens for s in stats.values())
    print(f"{tokens} {(peak_rss_bytes() - before) / 2**20:.1f}")


def part_c() -> None:
    rows = []
    for repeat in (1, 10):
        out = subprocess.run([sys.executable, __file__, "--scoring-peak", str(repeat)], check=True,
                             capture_output=True, text=True).stdout.split()
        rows.append((int(out[-2]), float(out[-1])))
    print("(c) calibration pass peak RSS growth (separate processes, SmolLM2-135M-shaped model, batch 8):")
    for tokens, mib in rows:
        print(f"    {tokens:>6} response tokens: +{mib:.1f} MiB")
    print(f"    ratio for 10x tokens: {rows[1][1] / max(rows[0][1], 1e-9):.2f}x (target: flat)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=("a", "b", "c", "all"))
    parser.add_argument("--scoring-peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scoring_peak:
        scoring_peak(args.scoring_peak)
        return
    if not args.no_header:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}")
    if args.part in ("a", "all"):
        part_a()
    if args.part in ("c", "all"):
        part_c()
    if args.part == "b":
        part_b()
    elif args.part == "all":  # its own process, so the peak RSS is its own
        subprocess.run([sys.executable, __file__, "--part", "b", "--no-header"], check=True)


if __name__ == "__main__":
    main()

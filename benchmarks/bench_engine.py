"""Engine benchmark: prints the figures issue 2 asks for, all measured in this one run.

(a) scoring overhead: `low_rank` and `wanda` calibration pass + scoring time over the same tokens, divided by
    a plain forward pass of the model carrying the reference adapter (target <= 1.3x);
(b) similarity + plan + patch on a Llama-3-8B-shaped trio (224 modules, rank 128, random bf16 weights):
    wall time (target < 5 s on CPU) for the first adapter against a safety patch and for each further one (the
    patch keeps its reference side), each next to its physical floor (the step's fp32 FLOPs at a measured fp32
    matmul rate, its bytes read and written at a measured copy rate); peak RSS against the three adapters' size
    (target < 2x);
(c) peak RSS of the calibration pass with 10x more calibration tokens (target: flat).

Usage: .venv/bin/python benchmarks/bench_engine.py [--part a|b|c|all] [--modules N]
Every run first prints the CPU it ran on (as `nlsr env` does): model, cores, torch threads, the features that
decide speed and whether bf16 is native (without it torch emulates bf16). `--modules N` runs (b) on the first N
modules only, for quick checks. The model of (a) and (c) is SmolLM2-135M-shaped (30 blocks, hidden 576, LoRA
r=16 on 7 targets) with random weights, so no download is needed.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import time

import torch

from nlsr_hub.adapters import LoraAdapter, LoraModule
from nlsr_hub.calibration import default_calibration, encode_pairs, iter_batches
from nlsr_hub.config import NLSRConfig
from nlsr_hub.envinfo import cpu_line, device_info
from nlsr_hub.hardware import NATIVE_BF16_FLAGS
from nlsr_hub.masks import ModuleMask
from nlsr_hub.modeling import attached_adapter
from nlsr_hub.patch import apply_plan, neuron_counts, similarities
from nlsr_hub.plan import RealignmentPlan, plan_realignment
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


def best_of(fn, repeats: int = 3) -> float:
    """The shortest of `repeats` timed calls of `fn` (after one untimed warm-up call)."""
    fn()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def matmul_rate(n: int = 2048) -> float:
    """fp32 FLOP/s of an n³ matmul, best of 3."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b)


def copy_rate(nbytes: int = 512 * 2**20) -> float:
    """Bytes read + written per second copying a large tensor, best of 3 (into memory already touched: a fresh
    `clone()` would also time the page faults of new memory, and the floor would be too high)."""
    source = torch.ones(nbytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    return 2 * nbytes / best_of(lambda: target.copy_(source))


def inner_flops(d_out: int, d_in: int, r1: int, r2: int) -> int:
    """fp32 FLOPs of one ``similarity._inner``: the r1×r2 Gram products B1ᵀB2 and A1A2ᵀ, their product and sum."""
    return 2 * r1 * r2 * (d_out + d_in) + 2 * r1 * r2


def step_flops(patch: SafetyPatch, finetuned: LoraAdapter, plan: RealignmentPlan, *, reference_known: bool) -> int:
    """fp32 FLOPs of similarity + patch as implemented: per module two inner products (three while the patch does not
    know its reference side yet) and the scale and mask products of both sides' factors; per patched module the
    reference B's rescaling and masking (the other blocks are masked in their own dtype)."""
    total = 0
    for name, ref in patch.reference.modules.items():
        ft, (d_out, d_in) = finetuned.modules[name], ref.shape
        total += inner_flops(d_out, d_in, ref.rank, ft.rank) + inner_flops(d_out, d_in, ft.rank, ft.rank)
        if not reference_known:
            total += inner_flops(d_out, d_in, ref.rank, ref.rank)
        total += 2 * d_out * (ref.rank + ft.rank)  # B: scale and mask
        total += d_in * (ref.rank + ft.rank) if patch.masks[name].A is not None else 0  # A: mask
    return total + sum(2 * patch.reference.modules[name].B.numel() for name in plan.patched)


def step_bytes(patch: SafetyPatch, finetuned: LoraAdapter, plan: RealignmentPlan) -> int:
    """Bytes the step must read and write: every module's factors (both sides) and masks for the similarity, the
    masks again for the neuron counts, and per patched module its inputs again and the rank-(r_e + r_t) output
    (the float32 working copies of one module at a time are not counted: this is a floor)."""
    def nbytes(*tensors: torch.Tensor | None) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def module_bytes(name: str) -> int:
        ref, ft, mask = patch.reference.modules[name], finetuned.modules[name], patch.masks[name]
        return nbytes(ref.A, ref.B, ft.A, ft.B, mask.A, mask.B)

    def output_bytes(name: str) -> int:  # [A_e; A_t] and [B_e | B_t] in the fine-tuned dtype
        ref, ft = patch.reference.modules[name], finetuned.modules[name]
        return (ref.rank + ft.rank) * (ft.shape[1] * ft.A.element_size() + ft.shape[0] * ft.B.element_size())

    masks = sum(nbytes(m.A, m.B) for m in patch.masks.values())
    patched = sum(module_bytes(name) + output_bytes(name) for name in plan.patched)
    return sum(module_bytes(name) for name in patch.reference.modules) + masks + patched


def realign_step(patch: SafetyPatch, finetuned: LoraAdapter) -> tuple[float, RealignmentPlan, LoraAdapter]:
    """Wall time of similarity + plan + patch, the plan and the realigned adapter."""
    start = time.perf_counter()
    sims = similarities(patch, finetuned)
    plan = plan_realignment(sims, neuron_counts(patch), NLSRConfig())
    realigned = apply_plan(finetuned, patch, plan)
    return time.perf_counter() - start, plan, realigned


def with_floor(seconds: float, flops: int, nbytes: int, flop_rate: float, byte_rate: float) -> str:
    """``X s (floor: compute Y s, memory Z s; X/max(Y,Z) = k×)``."""
    compute, memory = flops / flop_rate, nbytes / byte_rate
    return (f"{seconds:.2f} s (floor: compute {compute:.2f} s, memory {memory:.2f} s; "
            f"X/max(Y,Z) = {seconds / max(compute, memory):.2f}×)")


def part_b(modules: int | None = None) -> None:
    baseline = current_rss_bytes()
    shapes = module_shapes(4096, 14336, 1024, 32)
    shapes = dict(list(shapes.items())[:modules]) if modules else shapes
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
    first, plan, realigned = realign_step(patch, finetuned)
    peak = peak_rss_bytes()
    output = realigned.nbytes()
    del realigned
    gc.collect()
    further, again, _ = realign_step(patch, finetuned)
    flop_rate, byte_rate = matmul_rate(), copy_rate()  # after the peak RSS was read: the copy needs 1 GiB
    nbytes = step_bytes(patch, finetuned, plan)
    flops_first = step_flops(patch, finetuned, plan, reference_known=False)
    flops_further = step_flops(patch, finetuned, plan, reference_known=True)
    print(f"(b) Llama-3-8B-shaped trio: {len(shapes)} modules, rank {rank}, bf16; {plan.num_patched} modules patched")
    print(f"    measured here: fp32 matmul {flop_rate / 1e9:.1f} GFLOP/s (2048³, best of 3), copy "
          f"{byte_rate / 1e9:.1f} GB/s read + written (512 MiB, best of 3)")
    print(f"    step work: {flops_first / 1e9:.1f} GFLOP fp32 for the first adapter, {flops_further / 1e9:.1f} for "
          f"each further one; {nbytes / 1e9:.2f} GB read + written")
    print(f"    similarity + plan + patch, first adapter against the patch: "
          f"{with_floor(first, flops_first, nbytes, flop_rate, byte_rate)} (target < 5 s)")
    print(f"    each further adapter (reference side kept on the patch): "
          f"{with_floor(further, flops_further, nbytes, flop_rate, byte_rate)}; same plan: "
          f"{'yes' if again.to_dict() == plan.to_dict() else 'NO'}")
    print(f"    three adapters (aligned, reference, fine-tuned): {three / 2**30:.2f} GiB; inputs + masks in memory "
          f"before the step: {(before - baseline) / 2**30:.2f} GiB")
    print(f"    peak RSS above the interpreter baseline (first adapter): {(peak - baseline) / 2**30:.2f} GiB = "
          f"{(peak - baseline) / three:.2f}x the three adapters (target < 2x); output {output / 2**30:.2f} GiB")


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


def cpu_capability() -> str:
    """The CPU this run measured on, as `nlsr env` reports it, and whether bf16 is native here."""
    device = device_info()
    native = any(device["cpu_features"].get(flag) for flag in NATIVE_BF16_FLAGS)
    return (f"CPU: {cpu_line(device)}; torch {torch.__version__}; native bf16 "
            f"{'yes' if native else 'no (torch emulates bf16)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=("a", "b", "c", "all"))
    parser.add_argument("--modules", type=int, default=None, metavar="N",
                        help="run (b) on the first N of the 224 modules (default: all)")
    parser.add_argument("--scoring-peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.modules is not None and args.modules < 1:
        parser.error(f"--modules must be at least 1 (got {args.modules})")
    if args.scoring_peak:
        scoring_peak(args.scoring_peak)
        return
    if not args.no_header:
        print(cpu_capability())
    if args.part in ("a", "all"):
        part_a()
    if args.part in ("c", "all"):
        part_c()
    if args.part == "b":
        part_b(args.modules)
    elif args.part == "all":  # its own process, so the peak RSS is its own
        extra = ["--modules", str(args.modules)] if args.modules else []
        subprocess.run([sys.executable, __file__, "--part", "b", "--no-header", *extra], check=True)


if __name__ == "__main__":
    main()

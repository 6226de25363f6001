"""Same inputs and seed -> the same bytes; inputs never modified; the seed really drives the random draws."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlsr_hub import NLSRConfig, NLSRPatcher, load_adapter

OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json", "nlsr_config.json", "README.md")


def run(trio, out, config=None):
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config)
    result = patcher.realign(progress=False)
    return result, result.save_pretrained(out)


def test_two_runs_write_byte_identical_files_and_leave_inputs_untouched(trio, tree_sha256, tmp_path):
    inputs_before = tree_sha256(trio.base, trio.aligned, trio.finetuned)
    first, dir1 = run(trio, tmp_path / "one")
    second, dir2 = run(trio, tmp_path / "two")
    assert first.plan.num_patched > 0
    assert second.plan == first.plan
    names = sorted(p.name for p in dir1.iterdir())
    assert set(OUTPUT_FILES) <= set(names)
    assert names == sorted(p.name for p in dir2.iterdir())
    for name in names:
        assert (dir1 / name).read_bytes() == (dir2 / name).read_bytes(), name
    assert tree_sha256(trio.base, trio.aligned, trio.finetuned) == inputs_before
    # saving again over an existing folder gives the same bytes too
    first.save_pretrained(dir2)
    assert tree_sha256(dir2) == {k.replace(str(dir1), str(dir2)): v for k, v in tree_sha256(dir1).items()}


def test_gradient_scorer_runs_are_deterministic(trio, tree_sha256, tmp_path):
    inputs_before = tree_sha256(trio.base, trio.aligned, trio.finetuned)
    config = NLSRConfig(scorer="snip", max_calibration_samples=8)
    _, dir1 = run(trio, tmp_path / "one", config)
    _, dir2 = run(trio, tmp_path / "two", config)
    for name in OUTPUT_FILES:
        assert (dir1 / name).read_bytes() == (dir2 / name).read_bytes(), name
    assert tree_sha256(trio.base, trio.aligned, trio.finetuned) == inputs_before


def test_in_memory_inputs_and_base_model_are_not_modified(trio, load_base, tokenizer):
    model = load_base()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = {k: p.requires_grad for k, p in model.named_parameters()}
    finetuned, aligned = load_adapter(trio.finetuned), load_adapter(trio.aligned)
    tensors_before = {n: (m.A.clone(), m.B.clone(), m.scale) for n, m in finetuned.modules.items()}
    aligned_before = {n: (m.A.clone(), m.B.clone(), m.scale) for n, m in aligned.modules.items()}
    for scorer in ("low_rank", "snip"):  # forward-only and forward+backward passes
        patcher = NLSRPatcher(finetuned=finetuned, aligned=aligned, base=model, tokenizer=tokenizer,
                              config=NLSRConfig(scorer=scorer, max_calibration_samples=8))
        result = patcher.realign(progress=False)
        assert result.plan.num_patched > 0
    for adapter, before in ((finetuned, tensors_before), (aligned, aligned_before)):
        for name, (A, B, scale) in before.items():
            assert torch.equal(adapter[name].A, A) and torch.equal(adapter[name].B, B)
            assert adapter[name].scale == scale
    state = model.state_dict()
    assert state.keys() == weights_before.keys()  # the LoRA layers were unloaded again
    assert all(torch.equal(state[k], v) for k, v in weights_before.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags_before
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_different_seed_changes_the_adaptive_plan(trio):
    def draws(seed):
        patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                              config=NLSRConfig(seed=seed))
        plan = patcher.realign(dry_run=True, progress=False).plan
        return [m.draw for m in plan.modules], [m.similarity for m in plan.modules]

    draws_a, sims_a = draws(42)
    draws_a2, _ = draws(42)
    draws_b, sims_b = draws(7)
    assert draws_a == draws_a2
    assert draws_a != draws_b
    assert sims_a == sims_b  # the seed touches the draws only, not the low-rank scores


SCRIPT = """
import sys
from nlsr_hub import NLSRPatcher
from nlsr_hub.tiny import build_trio
base, aligned, finetuned, out, root = sys.argv[1:6]
patcher = NLSRPatcher.from_pretrained(base, aligned=aligned, finetuned=finetuned)
patcher.realign(progress=False).save_pretrained(out)
build_trio(root)
"""


@pytest.fixture(scope="module")
def two_processes(trio, tmp_path_factory) -> list[tuple[Path, Path]]:
    """Two fresh interpreters with different hash seeds, run concurrently: each realigns the session's trio
    into `out` and builds a new demo trio under `root`. Returns [(out, root), ...]."""
    tmp = tmp_path_factory.mktemp("processes")
    runs = [(tmp / f"out{i}", tmp / f"root{i}") for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(trio.base), str(trio.aligned), str(trio.finetuned),
                               str(out), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)})
             for seed, (out, root) in enumerate(runs, start=1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return runs


def test_output_bytes_do_not_depend_on_the_process(two_processes):
    """Same input files, two interpreters with different hash seeds: the same bytes (no set-order leaks)."""
    (out1, _), (out2, _) = two_processes
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_demo_trio_builds_byte_identically_across_processes(two_processes):
    """`nlsr_hub.tiny` promises a byte-identical build: compare two builds (the root path aside)."""
    (_, root1), (_, root2) = two_processes
    files = sorted(p.relative_to(root1) for p in root1.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root2) for p in root2.rglob("*") if p.is_file())
    for rel in files:
        first = (root1 / rel).read_bytes().replace(str(root1).encode(), b"ROOT")
        second = (root2 / rel).read_bytes().replace(str(root2).encode(), b"ROOT")
        assert first == second, f"{rel} differs between two builds"

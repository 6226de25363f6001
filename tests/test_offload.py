"""Big bases through accelerate (nlsr_hub/offload.py): a tiny model forced onto disk (and half onto disk) gives the
calibration statistics, masks and realignment it gives when loaded whole."""

from __future__ import annotations

import pytest
import torch

from nlsr_hub import NLSRConfig, NLSRPatcher, load_adapter
from nlsr_hub.offload import checkpoint_bytes, load_offloaded, parse_max_memory
from nlsr_hub.statistics import collect_statistics


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, cpu=500MB") == {0: 20 * 2**30, "cpu": 500 * 10**6}
    assert parse_max_memory({"CPU": 1000}) == {"cpu": 1000}
    assert parse_max_memory(None) is None
    for bad, pattern in (("cpu:1GB", "DEVICE=SIZE"), ("tpu=1GB", "unknown"), ("cpu=lots", "not a size"),
                         ("", "names no device"), ("cpu=0", "positive")):
        with pytest.raises(ValueError, match=pattern):
            parse_max_memory(bad)
    with pytest.raises(TypeError, match="max_memory"):
        parse_max_memory(3)


def forced_limits(trio) -> dict[str, dict[str, int]]:
    """max_memory that puts the whole model on disk, and one that keeps part of it in CPU memory."""
    size = checkpoint_bytes(trio.base)
    return {"disk": {"cpu": size // 4}, "cpu+disk": {"cpu": size // 2}}


@pytest.mark.parametrize("placement", ["disk", "cpu+disk"])
@pytest.mark.parametrize("needs", [frozenset({"activations"}), frozenset({"gradients"})], ids=["forward", "backward"])
def test_offloaded_statistics_equal_the_whole_model(trio, load_base, tokenizer, tmp_path, placement, needs):
    from nlsr_hub.calibration import default_calibration

    pairs = default_calibration()[:8]
    reference = load_adapter(trio.aligned)
    model, _ = load_offloaded(trio.base, max_memory=forced_limits(trio)[placement], offload_folder=tmp_path / "off")
    assert "disk" in set(model.hf_device_map.values())  # really offloaded
    got = collect_statistics(model, tokenizer, reference, pairs, needs=needs, batch_size=4, progress=False)
    want = collect_statistics(load_base(), tokenizer, reference, pairs, needs=needs, batch_size=4, progress=False)
    assert set(got) == set(want) == set(reference.modules)
    for name in want:
        for field in ("gram", "input_sq", "grad_A", "grad_B"):
            a, b = getattr(got[name], field), getattr(want[name], field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (name, field)


def test_max_memory_runs_the_patcher_with_offload_and_gives_the_same_realignment(trio, tmp_path):
    config = NLSRConfig.preset("default")
    whole = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config)
    offloaded = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config,
                                            max_memory=forced_limits(trio)["disk"], offload_folder=tmp_path / "off")
    want, got = whole.realign(progress=False), offloaded.realign(progress=False)
    assert "disk" in set(offloaded._model.hf_device_map.values())
    assert got.plan.modules == want.plan.modules
    for name, module in want.adapter.modules.items():
        assert torch.equal(got.adapter[name].A, module.A) and torch.equal(got.adapter[name].B, module.B), name


def test_bad_max_memory_fails_before_any_loading(trio):
    with pytest.raises(ValueError, match="max_memory"):
        NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, max_memory="gpu=lots")


def test_cli_patch_with_max_memory_equals_the_patch_without(trio, tmp_path):
    from nlsr_hub import SafetyPatch
    from nlsr_hub.cli import main

    common = ["patch", "--base", str(trio.base), "--aligned", str(trio.aligned)]
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert main([*common, "--max-memory", f"cpu={checkpoint_bytes(trio.base) // 4}", "--offload-folder",
                 str(tmp_path / "off"), "--output", str(tmp_path / "offloaded")]) == 0
    whole, offloaded = (SafetyPatch.from_pretrained(tmp_path / n) for n in ("whole", "offloaded"))
    for name, mask in whole.masks.items():
        assert torch.equal(offloaded.masks[name].B, mask.B), name
        assert torch.allclose(offloaded.input_norms[name], whole.input_norms[name], rtol=1e-6), name
    assert main([*common, "--max-memory", "cpu:1GB", "--output", str(tmp_path / "bad")]) == 2


def test_full_finetune_input_norms_are_the_same_offloaded(trio, load_base, tokenizer, tmp_path):
    """The full-fine-tune calibration pass (pre-hooks on the linear modules) also runs on an offloaded model."""
    from nlsr_hub.calibration import default_calibration
    from nlsr_hub.dense_norms import dense_input_norms

    pairs, names = default_calibration()[:8], sorted(load_adapter(trio.aligned).modules)
    model, _ = load_offloaded(trio.base, max_memory=forced_limits(trio)["disk"], offload_folder=tmp_path / "off")
    got, tokens = dense_input_norms(model, tokenizer, pairs, names, batch_size=4, progress=False)
    want, want_tokens = dense_input_norms(load_base(), tokenizer, pairs, names, batch_size=4, progress=False)
    assert tokens == want_tokens
    assert all(torch.allclose(got[n], want[n], rtol=1e-6) for n in names)

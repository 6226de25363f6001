"""`realign_peft_model`: the realigned adapter added beside the original in memory equals the saved-and-reloaded
realignment of the same inputs (logits), and the original adapter is unchanged."""

from __future__ import annotations

import pytest
import torch

from nlsr_hub import NLSRConfig, NLSRPatcher, realign_peft_model
from nlsr_hub.adapters import AdapterError
from nlsr_hub.inmemory import adapter_from_peft_model

INPUT_IDS = torch.tensor([[1, 20, 31, 45, 77, 101, 150, 200, 250, 300], [3, 9, 27, 81, 243, 5, 25, 125, 7, 49]])


def peft_model_of(load_base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), str(adapter)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def reloaded_logits(load_base, result, tmp_path) -> torch.Tensor:
    out = result.save_pretrained(tmp_path / "saved")
    return logits(peft_model_of(load_base, out))


def original_state(peft_model, name="default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if f".{name}." in k}


@pytest.fixture(scope="module")
def patch_dir(trio, tmp_path_factory):
    """A saved safety patch of the trio (default preset: activation norms, rows)."""
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned)
    return patcher.safety_patch(progress=False).save_pretrained(tmp_path_factory.mktemp("patch") / "patch")


@pytest.mark.parametrize("config", [None, NLSRConfig(), NLSRConfig(restorer="nlsr-dense", granularity="element",
                                                                     selection="fraction", fraction=0.5)],
                         ids=["default-preset", "paper-nlsr", "nlsr-dense-element"])
def test_safety_patch_in_memory_equals_saved_and_reloaded(trio, load_base, patch_dir, tmp_path, config):
    peft_model = peft_model_of(load_base, trio.finetuned)
    before, state = logits(peft_model), original_state(peft_model)
    result = realign_peft_model(peft_model, safety_patch=patch_dir, config=config, progress=False)
    assert peft_model.active_adapter == "nlsr" and set(peft_model.peft_config) == {"default", "nlsr"}
    got = logits(peft_model)
    disk = NLSRPatcher.from_pretrained(None, safety_patch=patch_dir, finetuned=trio.finetuned, config=config)
    want_result = disk.realign(progress=False)
    assert want_result.plan.modules == result.plan.modules
    assert torch.allclose(got, reloaded_logits(load_base, want_result, tmp_path), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, rtol=1e-3, atol=1e-3)  # the realigned adapter really is active
    peft_model.set_adapter("default")  # the original: same tensors, same logits
    assert all(torch.equal(v, state[k]) for k, v in original_state(peft_model).items())
    assert torch.equal(logits(peft_model), before)


def test_aligned_runs_the_calibration_pass_on_the_peft_model(trio, load_base, tokenizer, tmp_path):
    """Default preset from the aligned adapter: the calibration pass runs on the PeftModel itself (the reference as a
    temporary adapter) and gives what a pass on the bare base gives."""
    peft_model = peft_model_of(load_base, trio.finetuned)
    before = logits(peft_model)
    result = realign_peft_model(peft_model, aligned=trio.aligned, tokenizer=tokenizer, progress=False)
    assert set(peft_model.peft_config) == {"default", "nlsr"}  # the temporary reference adapter is gone
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned)
    want = patcher.realign(progress=False)
    assert want.plan.modules == result.plan.modules
    assert torch.allclose(logits(peft_model), reloaded_logits(load_base, want, tmp_path), rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model), before)


def test_saved_in_memory_adapter_is_the_result(trio, load_base, patch_dir, tmp_path):
    """`peft_model.save_pretrained(selected_adapters=["nlsr"])` writes the realigned adapter PEFT loads back."""
    from nlsr_hub import load_adapter

    peft_model = peft_model_of(load_base, trio.finetuned)
    result = realign_peft_model(peft_model, safety_patch=patch_dir, progress=False)
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["nlsr"])
    saved = load_adapter(tmp_path / "peft" / "nlsr")
    for name, module in result.adapter.modules.items():
        assert torch.equal(saved[name].A, module.A) and torch.equal(saved[name].B, module.B), name
        assert saved[name].scale == pytest.approx(module.scale, rel=1e-12)


def test_adapter_from_peft_model_equals_the_folder(trio, load_base):
    from nlsr_hub import load_adapter

    in_memory = adapter_from_peft_model(peft_model_of(load_base, trio.finetuned))
    on_disk = load_adapter(trio.finetuned)
    assert set(in_memory.modules) == set(on_disk.modules)
    for name, module in on_disk.modules.items():
        assert torch.equal(in_memory[name].A, module.A) and torch.equal(in_memory[name].B, module.B)
        assert in_memory[name].scale == module.scale


def test_bad_calls_name_the_problem(trio, load_base, patch_dir):
    peft_model = peft_model_of(load_base, trio.finetuned)
    with pytest.raises(TypeError, match=r"peft\.PeftModel"):
        realign_peft_model(load_base(), safety_patch=patch_dir)
    with pytest.raises(ValueError, match=r"`safety_patch`.*`aligned`"):
        realign_peft_model(peft_model)
    with pytest.raises(ValueError, match="`adapter_name` 'other'"):
        realign_peft_model(peft_model, safety_patch=patch_dir, adapter_name="other")
    with pytest.raises(ValueError, match="already an adapter"):
        realign_peft_model(peft_model, safety_patch=patch_dir, new_adapter_name="default")
    with pytest.raises(ValueError, match="tokenizer"):  # a calibration pass needs the tokenizer
        realign_peft_model(peft_model, aligned=trio.aligned, progress=False)
    assert set(peft_model.peft_config) == {"default"}  # nothing was added by a failed call
    peft_model.merge_adapter()
    with pytest.raises(AdapterError, match="unmerge"):
        realign_peft_model(peft_model, safety_patch=patch_dir)

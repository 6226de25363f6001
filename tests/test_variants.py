"""Adapter variants users train (nlsr_hub/variants.py).

rsLoRA and per-module rank/alpha patterns are realigned: an *identity patch* (the fine-tuned adapter as its own
reference, every module patched, so each realigned module doubles its rank while its update stays the same) must
leave the logits unchanged, saved and reloaded by PEFT and in memory. That is what catches a scale written for the
wrong rank (PEFT's ``add_weighted_adapter`` got rsLoRA wrong exactly this way). DoRA, ``lora_bias``, embedding LoRA
and quantised layers are refused with one error naming the variant.
"""

from __future__ import annotations

import json

import pytest
import torch

from nlsr_hub import NLSRConfig, NLSRPatcher, SafetyPatch, load_adapter, realign_peft_model
from nlsr_hub.adapters import AdapterError
from nlsr_hub.safety_patch import build_safety_patch

INPUT_IDS = torch.tensor([[1, 20, 31, 45, 77, 101, 150, 200, 250, 300]])
VARIANTS = {
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"down_proj": 4, "q_proj": 6}, "alpha_pattern": {"v_proj": 7, "o_proj": 3}},
}
IDENTITY_CONFIGS = {  # each leaves ΔW unchanged while rebuilding every module at twice its rank
    "nlsr-rows": NLSRConfig(restorer="nlsr", granularity="row", selection="fraction", fraction=1.0),
    "nlsr-dense-rows": NLSRConfig(restorer="nlsr-dense", granularity="row", selection="fraction", fraction=1.0),
    "interpolate": NLSRConfig(restorer="interpolate", strength=0.5),  # ΔW_t + ½(ΔW_t − ΔW_t) by concatenation
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_adapter(request, trio, make_lora, tmp_path_factory):
    return request.param, make_lora(trio.base, tmp_path_factory.mktemp(request.param) / "ft", rank=8, seed=7,
                                    **VARIANTS[request.param])


def identity_patch(adapter) -> SafetyPatch:
    """The adapter as its own reference, row masks (random scorer, no calibration), unit input norms."""
    patch = build_safety_patch(adapter, None, scorer="random", sparsity_ratio=0.8, granularity="row", seed=3)
    norms = {name: torch.ones(module.shape[1]) for name, module in adapter.modules.items()}
    return SafetyPatch(reference=patch.reference, masks=patch.masks, metadata={}, input_norms=norms)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def peft_model_of(load_base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), str(folder)).eval()


def _inputs(name: str, adapter) -> dict:
    return {"aligned": adapter} if name == "interpolate" else {"safety_patch": identity_patch(adapter)}


@pytest.mark.parametrize("name", sorted(IDENTITY_CONFIGS))
def test_identity_patch_leaves_the_logits_unchanged_saved_and_reloaded(variant_adapter, load_base, tmp_path, name):
    variant, folder = variant_adapter
    adapter = load_adapter(folder)
    config = IDENTITY_CONFIGS[name]
    result = NLSRPatcher(finetuned=adapter, config=config, **_inputs(name, adapter)).realign(progress=False)
    assert result.plan.num_patched == len(adapter)
    for module_name, module in result.adapter.modules.items():
        assert module.rank == 2 * adapter[module_name].rank  # every module really was rebuilt
    out = result.save_pretrained(tmp_path / "identity")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved.get("use_rslora", False) == (variant == "rslora")
    want = logits(peft_model_of(load_base, folder))
    got = logits(peft_model_of(load_base, out))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(IDENTITY_CONFIGS))
def test_identity_patch_leaves_the_logits_unchanged_in_memory(variant_adapter, load_base, name):
    _, folder = variant_adapter
    adapter = load_adapter(folder)
    peft_model = peft_model_of(load_base, folder)
    want = logits(peft_model)
    realign_peft_model(peft_model, config=IDENTITY_CONFIGS[name], progress=False, **_inputs(name, adapter))
    assert peft_model.active_adapter == "nlsr"
    assert torch.allclose(logits(peft_model), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"targets": ("q_proj", "embed_tokens")}, "embedding LoRA"),
], ids=["dora", "lora_bias", "embedding"])
def test_refused_variants_name_themselves_on_disk_and_in_memory(trio, make_lora, load_base, tmp_path, kwargs, named):
    folder = make_lora(trio.base, tmp_path / "variant", rank=4, seed=5, **kwargs)
    with pytest.raises(AdapterError, match=named) as disk:
        load_adapter(folder)
    assert "Fix:" in str(disk.value)
    with pytest.raises(AdapterError, match=named):
        NLSRPatcher.from_pretrained(None, safety_patch=None, aligned=folder, finetuned=folder)
    peft_model = peft_model_of(load_base, folder)
    with pytest.raises(AdapterError, match=named):
        realign_peft_model(peft_model, aligned=trio.aligned, progress=False)
    assert set(peft_model.peft_config) == {"default"}


class Linear4bit(torch.nn.Linear):
    """A stand-in carrying bitsandbytes' class name: the check recognises quantised layers by their type."""


def test_quantised_layers_are_refused_in_memory_with_the_fix(trio, load_base):
    from peft import LoraConfig, get_peft_model

    model = load_base()
    layer = model.model.layers[0].self_attn.q_proj
    quantised = Linear4bit(layer.in_features, layer.out_features, bias=False)
    quantised.weight = layer.weight
    model.model.layers[0].self_attn.q_proj = quantised
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(AdapterError, match=r"quantised layer.*save the adapter"):
        realign_peft_model(peft_model, aligned=trio.aligned, progress=False)


def test_a_quantised_checkpoint_is_refused_for_calibration(tmp_path):
    from nlsr_hub.variants import check_unquantised_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ValueError, match=r"quantised checkpoint.*'bitsandbytes'.*unquantised"):
        check_unquantised_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check_unquantised_checkpoint(tmp_path)  # a full-precision checkpoint passes

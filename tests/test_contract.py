"""The contract: realign -> save -> `PeftModel.from_pretrained` with no key warning -> deltas equal SPEC's formula.

Every expected delta here is computed densely (float64) from the reference adapter, the masks and the
fine-tuned adapter, independently of `nlsr_hub.patch`.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nlsr_hub import NLSRConfig, NLSRPatcher, RealignmentPlan, load_adapter
from nlsr_hub.adapters import LoraModule
from nlsr_hub.masks import ModuleMask

OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json", "nlsr_config.json", "README.md")
KEY_WARNING = re.compile(r"missing|unexpected|mismatch", re.IGNORECASE)


def dense(module: LoraModule) -> torch.Tensor:
    return module.scale * (module.B.double() @ module.A.double())


def expected_delta(restoration: str, ref: LoraModule, ft: LoraModule, mask: ModuleMask) -> torch.Tensor:
    """SPEC step 5 for a patched module, computed densely in float64."""
    if restoration == "module":
        return dense(ref)
    mask_B = mask.B.double()
    keep_A = torch.ones_like(ref.A, dtype=torch.float64) if mask.A is None else mask.A.double()
    A_e, A_t, B_e, B_t = ref.A.double(), ft.A.double(), ref.B.double(), ft.B.double()
    if restoration == "neuron":  # Eq. 11
        return (ref.scale * (mask_B * B_e) @ (keep_A * A_e)
                + ft.scale * ((1 - mask_B) * B_t) @ ((1 - keep_A) * A_t if mask.A is not None else A_t))
    if restoration == "swap":  # factor-wise swap, each side with its own scaling folded into B
        B = (1 - mask_B) * ft.scale * B_t + mask_B * ref.scale * B_e
        A = (1 - keep_A) * A_t + keep_A * A_e if mask.A is not None else A_t
        return B @ A
    raise AssertionError(restoration)


def load_peft(base_model: torch.nn.Module, directory: Path, caplog) -> tuple[torch.nn.Module, list[str]]:
    """`PeftModel.from_pretrained`, returning the model and every warning / log message it emitted."""
    from peft import PeftModel

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model, str(directory))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return model.eval(), messages


def loaded_delta(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, int]:
    layer = model.base_model.model.get_submodule(name)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.scaling["default"] * (B.double() @ A.double()), int(A.shape[0])


def realign_save_load(tmp_path, load_base, caplog, patcher: NLSRPatcher):
    result = patcher.realign(progress=False)
    out = result.save_pretrained(tmp_path / "realigned")
    model, messages = load_peft(load_base(), out, caplog)
    return result, out, model, messages


def check_against_formula(patcher: NLSRPatcher, result, out: Path, model, messages: list[str]) -> None:
    restoration = result.config.effective_restoration
    reference, finetuned, masks = patcher.reference_adapter(), patcher.finetuned, result.safety_patch.masks
    # 1. PEFT loads it cleanly: no key warning, every saved tensor lands in the model, nothing left out.
    assert not [m for m in messages if KEY_WARNING.search(m)], messages
    saved = load_file(str(out / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, tensor in saved.items():
        loaded_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert loaded_key in params, f"saved tensor {key} has no place in the loaded model"
        assert torch.equal(params[loaded_key].detach(), tensor)
    lora_params = {k for k in params if ".lora_A." in k or ".lora_B." in k}
    assert len(lora_params) == len(saved) == 2 * len(finetuned)
    # 2. Every module's loaded delta is the formula of its decision.
    saved_adapter = load_adapter(out)
    assert set(saved_adapter.modules) == set(finetuned.modules)
    for decision in result.plan.modules:
        name = decision.name
        delta, rank = loaded_delta(model, name)
        assert rank == saved_adapter[name].rank
        if decision.patched:
            expected = expected_delta(restoration, reference[name], finetuned[name], masks[name])
            assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-6), name
            assert not torch.allclose(delta, dense(finetuned[name]), rtol=1e-3, atol=1e-4), name
        else:
            assert torch.equal(saved_adapter[name].A, finetuned[name].A), name
            assert torch.equal(saved_adapter[name].B, finetuned[name].B), name
            assert saved_adapter[name].scale == finetuned[name].scale
            assert torch.allclose(delta, dense(finetuned[name]), rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize(
    ("changes", "patched_rank"),
    [
        ({"restoration": "neuron"}, 16),
        ({"restoration": "swap"}, 8),
        ({"restoration": "module"}, 8),
        ({"restoration": "neuron", "granularity": "row"}, 16),
        ({"restoration": "swap", "granularity": "row"}, 8),
        ({"restoration": "module", "granularity": "row"}, 8),
        ({"compat": True}, 8),  # published code: 2β-scaled factors, int(r·P_SR) directions, factor swap
        ({"scorer": "wanda", "beta": 0.0}, 16),
    ],
    ids=["neuron", "swap", "module", "neuron-row", "swap-row", "module-row", "compat", "wanda-beta0"],
)
def test_realign_save_load_matches_formula(trio, load_base, caplog, tmp_path, changes, patched_rank):
    config = NLSRConfig(selection="threshold", threshold=0.5, **changes)
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config)
    result, out, model, messages = realign_save_load(tmp_path, load_base, caplog, patcher)
    assert sorted(result.plan.patched) == sorted(trio.damaged)
    check_against_formula(patcher, result, out, model, messages)
    for name in result.plan.patched:  # per-module ranks travel through rank_pattern
        assert loaded_delta(model, name)[1] == patched_rank
    masks = result.safety_patch.masks
    assert all((m.A is None) == (config.granularity == "row") for m in masks.values())
    if config.compat:
        assert result.config.effective_restoration == "swap"


def test_default_config_contract_and_logits(trio, default_run, load_base, caplog, tmp_path):
    patcher, result = default_run
    assert result.config == NLSRConfig()
    assert 0 < result.plan.num_patched < len(result.plan.modules)  # both branches of the check run
    out = result.save_pretrained(tmp_path / "realigned")
    model, messages = load_peft(load_base(), out, caplog)
    check_against_formula(patcher, result, out, model, messages)

    # The loaded PeftModel computes base + expected deltas: compare with a manually merged base model.
    reference, finetuned, masks = patcher.reference_adapter(), patcher.finetuned, result.safety_patch.masks
    merged = load_base()
    with torch.no_grad():
        for decision in result.plan.modules:
            name = decision.name
            delta = (expected_delta("neuron", reference[name], finetuned[name], masks[name]) if decision.patched
                     else dense(finetuned[name]))
            weight = merged.get_submodule(name).weight
            weight.copy_((weight.double() + delta).to(weight.dtype))
    input_ids = torch.tensor([[1, 20, 31, 45, 77, 101, 150, 200, 250, 300]])
    with torch.no_grad():
        got = model(input_ids=input_ids).logits
        want = merged(input_ids=input_ids).logits
        plain = load_base()(input_ids=input_ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, rtol=1e-2, atol=1e-2)  # the adapter really is active


def test_weak_adapter_reference_is_dense_expo_and_contract_holds(trio, weak_adapter, load_base, caplog, tmp_path):
    config = NLSRConfig(granularity="row", selection="threshold", threshold=0.5)
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, weak=weak_adapter,
                                          finetuned=trio.finetuned, config=config)
    aligned, weak, reference = load_adapter(trio.aligned), load_adapter(weak_adapter), patcher.reference_adapter()
    beta = config.beta
    for name in aligned.modules:
        assert reference[name].rank == aligned[name].rank + weak[name].rank
        expected = (1 + beta) * dense(aligned[name]) - beta * dense(weak[name])
        assert torch.allclose(dense(reference[name]), expected, rtol=1e-5, atol=1e-6), name
    result, out, model, messages = realign_save_load(tmp_path, load_base, caplog, patcher)
    assert result.plan.num_patched > 0
    check_against_formula(patcher, result, out, model, messages)
    for name in result.plan.patched:
        assert loaded_delta(model, name)[1] == reference[name].rank + patcher.finetuned[name].rank


def test_row_granularity_accepts_a_finetuned_adapter_of_another_rank(trio, rank4_finetuned, load_base, caplog,
                                                                    tmp_path):
    config = NLSRConfig(granularity="row", selection="fraction", fraction=0.5)
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=rank4_finetuned, config=config)
    result, out, model, messages = realign_save_load(tmp_path, load_base, caplog, patcher)
    assert result.plan.num_patched == 7
    check_against_formula(patcher, result, out, model, messages)
    for name in result.plan.patched:
        assert loaded_delta(model, name)[1] == 8 + 4


def test_files_written_and_plan_round_trip(default_run, tmp_path):
    _, result = default_run
    out = result.save_pretrained(tmp_path / "realigned")
    written = {p.name for p in out.iterdir()}
    assert set(OUTPUT_FILES) <= written
    assert not [name for name in written if name.endswith((".tmp", ".bin", ".pt", ".pkl"))]  # no leftovers, no pickle
    plan = result.plan
    assert RealignmentPlan.from_json(plan.to_json()) == plan
    assert RealignmentPlan.load(out / "nlsr_plan.json") == plan
    assert NLSRConfig.from_json((out / "nlsr_config.json").read_text()) == result.config
    card = (out / "README.md").read_text()
    assert f"{plan.num_patched} / {len(plan.modules)}" in card
    assert "nlsr_plan.json" in card


def test_dry_run_gives_the_same_plan_and_no_adapter(trio, default_run):
    _, full = default_run
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                          config=NLSRConfig())
    dry = patcher.realign(dry_run=True, progress=False)
    assert dry.adapter is None
    assert dry.plan == full.plan
    assert dry.plan.to_json() == full.plan.to_json()


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_saved_safety_patch_reapplies_without_a_forward_pass(trio, default_run, tmp_path, granularity):
    if granularity == "element":
        _, result = default_run
    else:
        result = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                             config=NLSRConfig(granularity=granularity)).realign(progress=False)
    patch_dir = result.safety_patch.save_pretrained(tmp_path / "patch")
    # no base model at all: a calibration pass would fail, so none runs
    patcher = NLSRPatcher.from_pretrained(None, safety_patch=patch_dir, finetuned=trio.finetuned,
                                          config=result.config)
    again = patcher.realign(progress=False)
    assert again.plan.modules == result.plan.modules
    assert again.plan.calibration == result.plan.calibration
    for name, module in result.adapter.modules.items():
        assert torch.equal(again.adapter[name].A, module.A) and torch.equal(again.adapter[name].B, module.B)
        assert again.adapter[name].scale == module.scale


def test_rslora_and_source_patterns_survive_the_round_trip(trio, make_lora, load_base, caplog, tmp_path):
    """Per-module scales from rsLoRA and the source's own rank/alpha patterns: PEFT must rebuild them exactly."""
    kwargs = {"use_rslora": True, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"v_proj": 7, "o_proj": 3}}
    aligned = make_lora(trio.base, tmp_path / "aligned", rank=8, seed=1, **kwargs)
    finetuned = make_lora(trio.base, tmp_path / "finetuned", rank=8, seed=2, **kwargs)
    source = load_adapter(finetuned)
    assert source["model.layers.0.mlp.down_proj"].rank == 4
    assert source["model.layers.0.self_attn.v_proj"].scale == pytest.approx(7 / 8 ** 0.5)
    for changes in ({"restoration": "neuron"}, {"restoration": "module"}, {"restoration": "swap"}):
        config = NLSRConfig(selection="fraction", fraction=1.0, **changes)
        patcher = NLSRPatcher.from_pretrained(trio.base, aligned=aligned, finetuned=finetuned, config=config)
        out_dir = tmp_path / changes["restoration"]
        result, out, model, messages = realign_save_load(out_dir, load_base, caplog, patcher)
        assert result.plan.num_patched == 14
        check_against_formula(patcher, result, out, model, messages)

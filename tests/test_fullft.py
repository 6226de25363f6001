"""Full fine-tunes (nlsr_hub/fullft.py): dense checkpoints realigned through the weight deltas, written as a sharded
checkpoint in the fine-tuned layout or as an extracted LoRA; expected weights computed here in float64."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nlsr_hub import NLSRConfig, realign_full_finetune
from nlsr_hub.dense_checkpoint import INDEX_NAME, TensorInfo, read_checkpoint, write_shard
from nlsr_hub.restorers.dense import update_mask

SHARD = "150KB"  # the tiny models' checkpoints come in several shards
INPUT_IDS = torch.tensor([[1, 20, 31, 45, 77, 101, 150, 200, 250, 300]])


def _perturbed(base: Path, out: Path, seed: int, scale: float, source: Path | None = None, norm: bool = False) -> Path:
    """Save `source` (default: the base) with every target projection moved by seeded noise, sharded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlsr_hub.adapters import LLAMA_TARGETS

    model = AutoModelForCausalLM.from_pretrained(source or base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.rsplit(".", 2)[-2] in LLAMA_TARGETS:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
        if norm:  # a full fine-tune also moves tensors outside the projections
            model.model.norm.weight.add_(0.1)
    model.save_pretrained(out, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dense_trio(trio, tmp_path_factory):
    """base (the trio's), aligned = base + noise, finetuned = aligned + noise (+ a norm change), both sharded."""
    root = tmp_path_factory.mktemp("dense")
    aligned = _perturbed(trio.base, root / "aligned", seed=1, scale=0.02)
    finetuned = _perturbed(trio.base, root / "finetuned", seed=2, scale=0.02, source=aligned, norm=True)
    return {"base": trio.base, "aligned": aligned, "finetuned": finetuned}


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint(folder)
    return {key: checkpoint.read(key) for key in checkpoint.tensors}


def expected(restorer: str, w_t, w_a, w_0, config: NLSRConfig, norm=None) -> torch.Tensor:
    """W'' in float64 from the formulas (SPEC of nlsr_hub/dense_restore.py)."""
    t, a = w_t.double(), w_a.double()
    lam, beta = config.strength, config.beta
    if restorer == "interpolate":
        return t + lam * (a - t)
    d_t, d_a = t - w_0.double(), a - w_0.double()
    if restorer == "addback":
        return t + lam * d_a
    d_e = (1 + beta) * d_a
    mask = update_mask(d_e.float(), norm, config.sparsity_ratio, config.granularity).double()
    mask = mask.reshape(-1, 1) if mask.ndim == 1 else mask
    return t + (lam * mask * d_e if restorer == "nlsr-addback" else mask * (d_e - d_t))


CONFIGS = {
    "addback": NLSRConfig(restorer="addback", strength=0.5),
    "interpolate": NLSRConfig(restorer="interpolate", strength=0.3),
    "nlsr-addback": NLSRConfig.preset("default"),
    "nlsr-dense-element": NLSRConfig(restorer="nlsr-dense", selection="fraction", fraction=0.5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_output_is_the_formula_in_the_finetuned_layout(dense_trio, tokenizer, tmp_path, tree_sha256, name):
    config = CONFIGS[name]
    before = tree_sha256(*dense_trio.values())
    result = realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], base=dense_trio["base"],
                                   output=tmp_path / "out", config=config, progress=False)
    assert tree_sha256(*dense_trio.values()) == before  # inputs untouched
    out = result.output
    ft_index = json.loads((dense_trio["finetuned"] / INDEX_NAME).read_text())
    assert json.loads((out / INDEX_NAME).read_text()) == ft_index  # same shards, same tensors per shard
    assert (out / "config.json").read_bytes() == (dense_trio["finetuned"] / "config.json").read_bytes()
    got, w_t = weights_of(out), weights_of(dense_trio["finetuned"])
    w_a, w_0 = weights_of(dense_trio["aligned"]), load_file(str(dense_trio["base"] / "model.safetensors"))
    norms = _norms(dense_trio, tokenizer, result) if name.startswith("nlsr") else {}
    patched = set(result.plan.patched)
    assert patched and (len(patched) < len(result.plan.modules)) == (name == "nlsr-dense-element")
    for key, tensor in got.items():
        module = key[: -len(".weight")]
        if module not in patched:
            assert torch.equal(tensor, w_t[key]), key  # every other tensor bit-identical
            continue
        want = expected(config.restorer, w_t[key], w_a[key], w_0[key], config, norms.get(module))
        assert torch.allclose(tensor.double(), want, rtol=1e-5, atol=1e-6), key


def _norms(dense_trio, tokenizer, result) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from nlsr_hub.calibration import default_calibration
    from nlsr_hub.dense_norms import dense_input_norms

    model = AutoModelForCausalLM.from_pretrained(dense_trio["aligned"]).eval()
    pairs = default_calibration()[: result.plan.calibration["samples"]]
    return dense_input_norms(model, tokenizer, pairs, [m.name for m in result.plan.modules], progress=False)[0]


def test_dense_input_norms_equal_the_lora_path_statistics(dense_trio, tokenizer):
    """Pre-hooks on the linear modules see what the LoRA path's lora_A hooks see (with a zero-effect adapter)."""
    from transformers import AutoModelForCausalLM

    from nlsr_hub import LoraAdapter, LoraModule
    from nlsr_hub.calibration import default_calibration
    from nlsr_hub.dense_norms import dense_input_norms
    from nlsr_hub.statistics import collect_statistics

    model = AutoModelForCausalLM.from_pretrained(dense_trio["aligned"]).eval()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    zero = LoraAdapter({n: LoraModule(torch.ones(2, model.get_submodule(n).in_features),
                                      torch.zeros(model.get_submodule(n).out_features, 2), 1.0) for n in names},
                       {"r": 2, "lora_alpha": 2})
    pairs = default_calibration()[:8]
    norms, tokens = dense_input_norms(model, tokenizer, pairs, names, batch_size=4, progress=False)
    stats = collect_statistics(model, tokenizer, zero, pairs, needs=frozenset({"activations"}), batch_size=4,
                               progress=False)
    assert tokens == stats[names[0]].tokens
    for name in names:
        assert torch.allclose(norms[name], stats[name].input_sq.sqrt().float(), rtol=1e-5), name


def test_dense_output_loads_with_transformers(dense_trio, tmp_path):
    from transformers import AutoModelForCausalLM

    config = CONFIGS["addback"]
    out = realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], base=dense_trio["base"],
                                output=tmp_path / "out", config=config, progress=False).output
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    manual = AutoModelForCausalLM.from_pretrained(dense_trio["finetuned"]).eval()
    w_a, w_0 = weights_of(dense_trio["aligned"]), load_file(str(dense_trio["base"] / "model.safetensors"))
    with torch.no_grad():
        for name, param in manual.named_parameters():
            if name.rsplit(".", 2)[-2].endswith("proj"):
                param.copy_(expected("addback", param, w_a[name], w_0[name], config).float())
        assert torch.allclose(model(input_ids=INPUT_IDS).logits, manual(input_ids=INPUT_IDS).logits, atol=1e-5)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_lora_output_is_the_realigned_update_with_its_error_in_the_plan(dense_trio, load_base, tmp_path, caplog,
                                                                       with_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = NLSRConfig(restorer="interpolate", strength=0.3, kept_energy=0.9)
    base = dense_trio["base"] if with_base else None
    with caplog.at_level(logging.WARNING):
        result = realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], base=base,
                                       output=tmp_path / "lora", output_format="lora", config=config, progress=False)
    assert "model.norm.weight" in result.plan.inputs["full_finetune"]["not_in_lora"]  # left out, and said so
    assert "not in the LoRA" in caplog.text
    w_t, w_a = weights_of(dense_trio["finetuned"]), weights_of(dense_trio["aligned"])
    reference_folder = dense_trio["base"] if with_base else dense_trio["aligned"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(reference_folder), str(result.output))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    w_ref = weights_of(reference_folder)
    for decision in result.plan.modules:
        key = f"{decision.name}.weight"
        want = expected("interpolate", w_t[key], w_a[key], None, config) - w_ref[key].double()
        layer = model.base_model.model.get_submodule(decision.name)
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = layer.scaling["default"] * (B @ A)
        error = float((delta - want).norm() / want.norm())
        assert decision.rank == A.shape[0] and decision.error is not None
        assert error == pytest.approx(decision.error, rel=1e-3, abs=1e-6), decision.name
        assert decision.error <= (1 - config.kept_energy) ** 0.5 + 1e-6


def test_lora_output_with_all_energy_equals_the_dense_output(dense_trio, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = NLSRConfig(restorer="addback", strength=0.5, kept_energy=1.0)
    kwargs = {"aligned": dense_trio["aligned"], "base": dense_trio["base"], "config": config, "progress": False,
              "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    dense = realign_full_finetune(dense_trio["finetuned"], output=tmp_path / "dense", **kwargs)
    lora = realign_full_finetune(dense_trio["finetuned"], output=tmp_path / "lora", output_format="lora", **kwargs)
    assert all(d.error < 1e-5 for d in lora.plan.modules)
    # the LoRA lacks the fine-tune's norm change: compare with the dense output carrying the base's norm
    dense_model = AutoModelForCausalLM.from_pretrained(dense.output).eval()
    with torch.no_grad():
        dense_model.model.norm.weight.copy_(AutoModelForCausalLM.from_pretrained(dense_trio["base"]).model.norm.weight)
        lora_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense_trio["base"]),
                                               str(lora.output)).eval()
        assert torch.allclose(lora_model(input_ids=INPUT_IDS).logits, dense_model(input_ids=INPUT_IDS).logits,
                              atol=1e-4)


def test_dry_run_writes_nothing_and_refusals_name_the_fix(dense_trio, tmp_path):
    plan = realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], base=dense_trio["base"],
                                 config=CONFIGS["addback"], dry_run=True, progress=False).plan
    assert plan.num_patched == len(plan.modules) == 14
    with pytest.raises(ValueError, match="works on LoRA factors"):
        realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], base=dense_trio["base"],
                              output=tmp_path / "x", config=NLSRConfig())
    with pytest.raises(ValueError, match="needs the base checkpoint"):
        realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], output=tmp_path / "x",
                              config=CONFIGS["addback"])
    with pytest.raises(ValueError, match="`output_format`"):
        realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], output=tmp_path / "x",
                              output_format="gguf", config=CONFIGS["interpolate"])
    with pytest.raises(ValueError, match="inside"):
        realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], config=CONFIGS["interpolate"],
                              output=dense_trio["finetuned"] / "out", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled weights"):
        realign_full_finetune(pickled, aligned=dense_trio["aligned"], output=tmp_path / "x",
                              config=CONFIGS["interpolate"])
    assert not (tmp_path / "x").exists()


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    tensors = {"a.bf16": torch.randn(3, 5).to(torch.bfloat16), "b.f16": torch.randn(7).half(),
               "c.f32": torch.randn(2, 2, 2), "d.i64": torch.arange(6), "e.bool": torch.tensor([True, False]),
               "f.empty": torch.zeros(0, 4)}
    write_shard(tmp_path / "x.safetensors", {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                tensors.__getitem__)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="announced"):
        write_shard(tmp_path / "y.safetensors", {"a": TensorInfo(torch.float32, (2,))}, lambda _: torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_module_functions_never_modify_their_inputs(dtype, name):
    from nlsr_hub.dense_restore import ModuleWeights, correction, module_mask, module_similarity

    generator = torch.Generator().manual_seed(0)
    w_t, w_a, w_0 = (torch.randn(6, 5, generator=generator).to(dtype) for _ in range(3))
    copies = [w.clone() for w in (w_t, w_a, w_0)]
    weights, config = ModuleWeights(w_t, w_a, w_0), CONFIGS[name]
    mask = module_mask(weights, torch.ones(5), config) if name.startswith("nlsr") else None
    module_similarity(weights, config, mask)
    correction(weights, config, mask)
    assert all(torch.equal(w, c) for w, c in zip((w_t, w_a, w_0), copies, strict=True))


def test_cli_realign_full_writes_what_the_api_writes(dense_trio, tmp_path, capsys):
    from nlsr_hub.cli import main

    rc = main(["realign-full", "--finetuned", str(dense_trio["finetuned"]), "--aligned", str(dense_trio["aligned"]),
               "--restorer", "interpolate", "--strength", "0.3", "--format", "lora", "--kept-energy", "0.95",
               "--output", str(tmp_path / "cli")])
    assert rc == 0 and "written to" in capsys.readouterr().out
    api = realign_full_finetune(dense_trio["finetuned"], aligned=dense_trio["aligned"], output=tmp_path / "api",
                                output_format="lora", progress=False,
                                config=NLSRConfig.preset("default", restorer="interpolate", strength=0.3,
                                                         kept_energy=0.95))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (api.output / name).read_bytes()
    rc = main(["realign-full", "--finetuned", str(dense_trio["finetuned"]), "--aligned", str(dense_trio["aligned"]),
               "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("nlsr realign-full: error:") and "needs the base checkpoint" in err

"""Bad input: each case is a clear error naming the problem, and no input file is touched by the failing call."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nlsr_hub import SCORERS, AdapterError, NLSRConfig, NLSRPatcher, load_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def ft_copy(trio, tmp_path) -> Path:
    """A private copy of the fine-tuned adapter, to damage."""
    return Path(shutil.copytree(trio.finetuned, tmp_path / "finetuned"))


@pytest.fixture(scope="module")
def other_base_lora(tmp_path_factory, make_lora) -> Path:
    """A LoRA on another tiny base (hidden size 32) whose folder is also called `base`, so only shapes differ."""
    from nlsr_hub.tiny import build_tiny_base

    root = tmp_path_factory.mktemp("other")
    base = build_tiny_base(root / "base", hidden_size=32)
    return make_lora(base, root / "finetuned", rank=8, seed=99)


@pytest.fixture
def unchanged(trio, tree_sha256):
    """`unchanged(*extra_dirs)` -> a context manager asserting the trio and the folders keep their bytes."""
    import contextlib

    @contextlib.contextmanager
    def check(*dirs: Path):
        roots = (trio.base, trio.aligned, trio.finetuned, *dirs)
        before = tree_sha256(*roots)
        yield
        assert tree_sha256(*roots) == before

    return check


def realign(trio, *, finetuned=None, aligned=None, config=None, calibration=None, **kwargs):
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=aligned or trio.aligned,
                                          finetuned=finetuned or trio.finetuned, config=config, **kwargs)
    return patcher.realign(calibration, progress=False)


# --------------------------------------------------------------------------------------------- adapters


def test_adapters_of_different_base_models(trio, ft_copy, unchanged):
    config_path = ft_copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "meta-llama/Meta-Llama-3-8B"
    config_path.write_text(json.dumps(config))
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"different base models.*Meta-Llama-3-8B"):
        realign(trio, finetuned=ft_copy)
    with unchanged(ft_copy):  # the documented escape hatch when the names differ but the model is the same
        assert realign(trio, finetuned=ft_copy, strict_base=False).adapter is not None


def test_finetuned_adapter_from_a_base_with_another_hidden_size(trio, other_base_lora, unchanged):
    with unchanged(other_base_lora), pytest.raises(AdapterError, match=r"shape.*different base models"):
        realign(trio, finetuned=other_base_lora)


def test_aligned_adapter_that_does_not_match_the_finetuned_one(trio, other_base_lora, unchanged):
    # caught before any forward pass: the adapters disagree with each other
    with unchanged(other_base_lora), pytest.raises(AdapterError, match=r"shape .*different base model"):
        realign(trio, aligned=other_base_lora)


def test_adapters_that_do_not_fit_the_base_model(trio, other_base_lora, unchanged):
    # the adapters agree with each other but not with the base model they are applied to
    with unchanged(other_base_lora), pytest.raises(AdapterError, match=r"weight shape .*different base model"):
        realign(trio, aligned=other_base_lora, finetuned=other_base_lora)


def test_finetuned_adapter_missing_a_target_module(trio, ft_copy, unchanged):
    tensors = load_file(str(ft_copy / WEIGHTS))
    dropped = "model.layers.1.mlp.up_proj"
    tensors = {k: v for k, v in tensors.items() if f".{dropped}." not in k}
    save_file(tensors, str(ft_copy / WEIGHTS))
    with unchanged(ft_copy), pytest.raises(AdapterError, match=rf"target different modules.*{re.escape(dropped)}"):
        realign(trio, finetuned=ft_copy)


def test_module_with_only_one_factor(trio, ft_copy, unchanged):
    tensors = load_file(str(ft_copy / WEIGHTS))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("layers.0.self_attn.q_proj.lora_B.weight")}
    save_file(tensors, str(ft_copy / WEIGHTS))
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"q_proj.*no lora_B tensor"):
        realign(trio, finetuned=ft_copy)


def test_missing_weights_file(trio, ft_copy, unchanged):
    (ft_copy / WEIGHTS).unlink()
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"adapter_model\.safetensors` is missing"):
        realign(trio, finetuned=ft_copy)


def test_missing_config_file(trio, ft_copy, unchanged):
    (ft_copy / "adapter_config.json").unlink()
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"adapter_config\.json` is missing"):
        realign(trio, finetuned=ft_copy)


def test_corrupt_config_file(trio, ft_copy, unchanged):
    (ft_copy / "adapter_config.json").write_text("{not json")
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"not valid JSON"):
        realign(trio, finetuned=ft_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(trio, ft_copy, unchanged, damage):
    path = ft_copy / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x13\x37 not safetensors " * 20,
                      "empty": b""}[damage])
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"could not be read as safetensors.*corrupt"):
        realign(trio, finetuned=ft_copy)


def test_pickled_weights_refused_by_default_and_accepted_with_allow_pickle(trio, ft_copy, unchanged, default_run):
    torch.save(load_file(str(ft_copy / WEIGHTS)), ft_copy / "adapter_model.bin")
    (ft_copy / WEIGHTS).unlink()
    with unchanged(ft_copy), pytest.raises(AdapterError, match=r"adapter_model\.bin.*allow_pickle=True"):
        realign(trio, finetuned=ft_copy)
    with unchanged(ft_copy):
        result = realign(trio, finetuned=ft_copy, allow_pickle=True, config=NLSRConfig())
    expected = load_adapter(trio.finetuned)
    pickled = load_adapter(ft_copy, allow_pickle=True)
    for name, module in expected.modules.items():
        assert torch.equal(pickled[name].A, module.A) and torch.equal(pickled[name].B, module.B)
    assert [m.similarity for m in result.plan.modules] == [m.similarity for m in default_run[1].plan.modules]


def test_element_granularity_with_mismatched_ranks_suggests_row(trio, rank4_finetuned, unchanged):
    with unchanged(rank4_finetuned), pytest.raises(AdapterError, match=re.escape("granularity='row'")):
        realign(trio, finetuned=rank4_finetuned, config=NLSRConfig.preset("paper"))
    with unchanged(rank4_finetuned), pytest.raises(AdapterError, match=r"shared LoRA basis"):
        realign(trio, finetuned=rank4_finetuned, config=NLSRConfig(granularity="row", restoration="swap"))


def test_weak_reference_at_element_granularity_suggests_row(trio, weak_adapter, unchanged):
    """EXPO with a weak adapter gives a rank r_a + r_w reference: no shared basis with the fine-tuned adapter."""
    with unchanged(weak_adapter), pytest.raises(AdapterError, match=r"rank 12 in the reference.*granularity='row'"):
        realign(trio, weak=weak_adapter, config=NLSRConfig.preset("paper"))


def test_adapter_path_pointing_to_a_file(trio, unchanged):
    """Passing the weights file instead of its folder: the message must not claim the path does not exist."""
    weights = trio.finetuned / WEIGHTS
    with unchanged(), pytest.raises(AdapterError, match=r"folder") as info:
        realign(trio, finetuned=weights)
    assert "does not exist" not in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("spec", ["/nonexistent/nlsr/adapter", "./no-such-adapter-folder", "~/no/such/adapter/x"])
def test_nonexistent_local_path(trio, unchanged, spec):
    with unchanged(), pytest.raises(ValueError, match=rf"{re.escape(spec)}.*no such local folder"):
        realign(trio, aligned=spec)


@pytest.mark.parametrize("spec", ["not a repo id!!", "org/na me", "a/b@"])
def test_invalid_repo_id(trio, unchanged, spec):
    with unchanged(), pytest.raises(ValueError, match=r"not a valid Hub repo id|no such local folder"):
        realign(trio, finetuned=spec)


def test_uncached_repo_with_local_files_only(trio, unchanged):
    """`local_files_only=True` and an id not in the cache: the message must say so (not 'lacks the files')."""
    with unchanged(), pytest.raises(ValueError, match=r"not in the local Hub cache"):
        realign(trio, finetuned="nlsr-tests/not-cached-anywhere", local_files_only=True)


def test_nonexistent_base_model_path(trio, unchanged):
    patcher = NLSRPatcher.from_pretrained("/nonexistent/base/model", aligned=trio.aligned, finetuned=trio.finetuned)
    with unchanged(), pytest.raises(ValueError, match=r"no such local folder"):
        patcher.realign(progress=False)


# --------------------------------------------------------------------------------------------- config, calibration


@pytest.mark.parametrize("calibration", [[], [("", "")], [{"prompt": "  ", "response": "x"}]])
def test_empty_calibration_data(trio, unchanged, calibration):
    with unchanged(), pytest.raises(ValueError, match=r"calibration data is empty"):
        realign(trio, calibration=calibration)


def test_calibration_rows_without_known_fields(trio, unchanged):
    with unchanged(), pytest.raises(ValueError, match=r"prompt field.*response field.*\['text'\]"):
        realign(trio, calibration=[{"text": "hello"}])


def test_unknown_scorer_lists_the_valid_ones():
    valid = ", ".join(sorted(SCORERS))
    assert {"low_rank", "wanda", "snip", "preference_snip", "random"} <= set(SCORERS)
    with pytest.raises(ValueError, match=rf"`scorer` 'nope'.*{re.escape(valid)}"):
        NLSRConfig(scorer="nope")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sparsity_ratio": 1.5}, r"`sparsity_ratio` must lie in \[0, 1\].*1\.5"),
        ({"sparsity_ratio": 1.0}, r"`sparsity_ratio` must be < 1"),
        ({"prune_ratio": -0.1}, r"`prune_ratio` must lie in \[0, 1\].*-0\.1"),
        ({"epsilon": 0.6}, r"`epsilon` must lie in .*epsilon=0\.6"),
        ({"epsilon": 0.4, "prune_ratio": 0.8}, r"`epsilon`"),
        ({"fraction": 2}, r"`fraction` must lie in \[0, 1\].*2"),
        ({"beta": -1}, r"`beta` must be >= 0"),
        ({"threshold": 1.5}, r"`threshold`.*\[-1, 1\]"),
        ({"granularity": "column"}, r"`granularity` 'column'.*element, row"),
        ({"selection": "best"}, r"`selection` 'best'.*adaptive, threshold, fraction, blocks"),
        ({"restoration": "merge"}, r"`restoration` 'merge'.*neuron, swap, module"),
        ({"selection": "blocks"}, r"`selection='blocks'` needs `blocks`"),
        ({"selection": "blocks", "blocks": "3-1"}, r"`blocks`"),
        ({"max_calibration_samples": 0}, r"`max_calibration_samples` must be a positive integer"),
        ({"compat": True, "restoration": "module"}, r"`compat=True`.*'module'"),
    ],
)
def test_out_of_range_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        NLSRConfig(**changes)


def test_save_pretrained_on_a_dry_run(trio, unchanged, tmp_path):
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned)
    dry = patcher.realign(dry_run=True, progress=False)
    with unchanged(), pytest.raises(ValueError, match=r"dry run.*dry_run=True"):
        dry.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compat_with_a_weak_adapter(trio, weak_adapter, unchanged):
    with unchanged(weak_adapter), pytest.raises(ValueError, match=r"`compat=True`.*weak"):
        NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, weak=weak_adapter, finetuned=trio.finetuned,
                                    config=NLSRConfig(compat=True))


def test_no_reference_source(trio):
    with pytest.raises(ValueError, match=r"`aligned`.*`reference`.*`safety_patch`"):
        NLSRPatcher.from_pretrained(trio.base, finetuned=trio.finetuned)

"""Issue #18: the bad-input contract, one test per defect the hostile probe found.

The contract: a bad input is refused with one error that names the problem and the fix (one line and exit code 2
from the CLI; a `ValueError` / `TypeError` from the library), before any calibration pass where it can be known
without the model; no input file ever changes; an output is written beside its folder and swapped in whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nlsr_hub import AdapterError, NLSRConfig, NLSRPatcher, RealignmentPlan, SafetyPatch, load_adapter
from nlsr_hub.cli import main

WEIGHTS = "adapter_model.safetensors"
MODULE = "model.layers.0.self_attn.q_proj"
KEY_B = f"base_model.model.{MODULE}.lora_B.weight"


# --------------------------------------------------------------------------------------------- helpers & fixtures


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `nlsr` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> None:
    """Exit code 2, a single stderr line ``nlsr <command>: error: ...`` matching `pattern`, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nlsr {command}: error: "), err
    assert re.search(pattern, lines[0]), err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the base model is loaded or a calibration pass starts: the error must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the base model was loaded / the calibration pass ran before the error")

    monkeypatch.setattr("nlsr_hub.patcher.load_base_model", forbidden)
    monkeypatch.setattr("nlsr_hub.patcher.collect_statistics", forbidden)
    monkeypatch.setattr("nlsr_hub.evaluation.loading.load_base_model", forbidden)


@pytest.fixture
def unchanged(trio, tree_sha256):
    """`with unchanged(*extra):` asserts the trio and the extra folders keep every byte."""
    import contextlib

    @contextlib.contextmanager
    def check(*extra: Path):
        roots = (trio.base, trio.aligned, trio.finetuned, *extra)
        before = tree_sha256(*roots)
        yield
        assert tree_sha256(*roots) == before

    return check


@pytest.fixture
def ft_copy(trio, tmp_path) -> Path:
    return Path(shutil.copytree(trio.finetuned, tmp_path / "finetuned"))


@pytest.fixture
def aligned_copy(trio, tmp_path) -> Path:
    return Path(shutil.copytree(trio.aligned, tmp_path / "aligned"))


@pytest.fixture(scope="module")
def saved_patch(trio, tmp_path_factory) -> Path:
    """A safety patch of the trio (paper settings), saved once for this module."""
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, config=NLSRConfig())
    return patcher.safety_patch(progress=False).save_pretrained(tmp_path_factory.mktemp("patch") / "patch")


@pytest.fixture
def patch_copy(saved_patch, tmp_path) -> Path:
    return Path(shutil.copytree(saved_patch, tmp_path / "patch"))


@pytest.fixture(scope="module")
def saved_result(trio, saved_patch, tmp_path_factory) -> Path:
    """A realigned result of the trio saved once (from the saved patch: no calibration pass)."""
    patcher = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=saved_patch,
                                          config=NLSRConfig())
    return patcher.realign(progress=False).save_pretrained(tmp_path_factory.mktemp("result") / "result")


def set_tensor(folder: Path, file: str, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(folder / file))
    tensors[key] = value
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def poison(folder: Path, key: str = KEY_B, value: float = float("nan"), file: str = WEIGHTS) -> None:
    """Put `value` (NaN by default) into one entry of tensor `key`."""
    tensor = load_file(str(folder / file))[key].clone()
    tensor.view(-1)[0] = value
    set_tensor(folder, file, key, tensor)


# --------------------------------------------------------------------------------------------- 1. NaN / inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_in_the_finetuned_adapter_is_refused_naming_the_module(trio, ft_copy, unchanged, no_model, capsys,
                                                                   value):
    poison(ft_copy, value=value)
    with unchanged(ft_copy), pytest.raises(AdapterError, match=rf"{re.escape(MODULE)}.*NaN or infinite.*lora_B"):
        NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=ft_copy)
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", ft_copy)
    assert_one_line_error(rc, err, "plan", rf"{re.escape(MODULE)}.*NaN or infinite")


def test_similarity_of_nan_factors_is_an_error_never_one():
    from nlsr_hub.adapters import LoraModule
    from nlsr_hub.masks import ModuleMask
    from nlsr_hub.similarity import NonFiniteError, lowrank_cosine, module_similarity

    A, B = torch.randn(4, 6), torch.randn(5, 4)
    bad = B.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        lowrank_cosine(bad, A, B, A)
    huge = torch.full((5, 4), 1e30)  # finite, but the product overflows float32
    with pytest.raises(ValueError, match="not finite"):
        lowrank_cosine(huge, A, huge, A)
    mask = ModuleMask(A=torch.ones(4, 6, dtype=torch.bool), B=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(NonFiniteError, match=r"Module m\.q_proj"):
        module_similarity(LoraModule(A, bad, 1.0), LoraModule(A, B, 1.0), mask, "m.q_proj")


def test_nan_in_a_safety_patch_is_refused(trio, patch_copy, capsys):
    poison(patch_copy, key=f"{MODULE}.ref_B", file="nlsr_safety_patch.safetensors")
    with pytest.raises(AdapterError, match=rf"{re.escape(MODULE)}.*NaN or infinite"):
        SafetyPatch.from_pretrained(patch_copy)
    rc, _, err = cli(capsys, "plan", "--safety-patch", patch_copy, "--finetuned", trio.finetuned)
    assert_one_line_error(rc, err, "plan", rf"{re.escape(MODULE)}.*NaN or infinite")


@pytest.mark.parametrize("beta", ["nan", "inf", "-inf", "1e308"])
def test_reference_command_refuses_a_non_finite_beta_and_writes_nothing(trio, tmp_path, unchanged, capsys, beta):
    out = tmp_path / "reference"
    with unchanged():
        rc, _, err = cli(capsys, "reference", "--aligned", trio.aligned, f"--beta={beta}", "--output", out)
    assert_one_line_error(rc, err, "reference", r"`beta` must be a finite number|non-finite LoRA scale.*beta")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("beta", ["nan", "inf"])
def test_realign_refuses_a_non_finite_beta_before_the_calibration_pass(trio, tmp_path, no_model, capsys, beta):
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--beta", beta, "--output", tmp_path / "out")
    assert_one_line_error(rc, err, "realign", r"`beta` must be a finite number")
    assert not (tmp_path / "out").exists()


def test_inf_in_the_aligned_adapter_is_refused_before_the_calibration_pass(trio, aligned_copy, unchanged, no_model,
                                                                           capsys, tmp_path):
    poison(aligned_copy, value=float("inf"))
    with unchanged(aligned_copy):
        rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", aligned_copy, "--finetuned",
                         trio.finetuned, "--output", tmp_path / "out")
    assert_one_line_error(rc, err, "realign", rf"{re.escape(MODULE)}.*NaN or infinite")


def test_nan_calibration_statistics_are_refused_not_turned_into_masks(trio, tmp_path, unchanged):
    """A base model with NaN weights: the calibration pass gives NaN statistics; no mask is built from them."""
    base = Path(shutil.copytree(trio.base, tmp_path / "base"))
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.endswith("layers.0.self_attn.q_proj.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    patcher = NLSRPatcher.from_pretrained(base, aligned=trio.aligned, finetuned=trio.finetuned, config=NLSRConfig())
    with unchanged(base), pytest.raises(ValueError, match=r"calibration pass gave NaN or infinite .* module"):
        patcher.realign(progress=False)


# --------------------------------------------------------------------------------------------- 2. Hub subfolders


@pytest.mark.parametrize("spec", ["org/name:../../etc", "org/name:sub/../../x", "org/name@main:..", "org/n:a\\..\\b"])
def test_a_hub_subfolder_cannot_leave_its_snapshot(tmp_path, spec):
    from nlsr_hub.hub import resolve

    with pytest.raises(ValueError, match=r"leaves the repository"):
        resolve(spec, cache_dir=tmp_path, local_files_only=True)


def test_a_revision_with_dots_is_refused(tmp_path):
    from nlsr_hub.hub import resolve

    with pytest.raises(ValueError, match=r"not a valid branch, tag or commit"):
        resolve("org/name@../../x", cache_dir=tmp_path, local_files_only=True)


def test_a_cached_repo_cannot_serve_a_local_folder_through_its_subfolder(tmp_path, trio):
    """The probe's case: the repo is in the cache and the subfolder walks from its snapshot to any local folder."""
    from nlsr_hub.hub import resolve

    snapshot = tmp_path / "models--org--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("0" * 40)
    escape = os.path.relpath(trio.finetuned, snapshot)
    with pytest.raises(ValueError, match=r"leaves the repository|leads outside"):
        resolve(f"org/name:{escape}", cache_dir=tmp_path, local_files_only=True)


def test_a_subfolder_linking_out_of_the_snapshot_is_refused(tmp_path, trio):
    """Second line of defence: a subfolder that is a link inside the cached snapshot may not lead outside it."""
    from nlsr_hub.hub import resolve

    snapshot = tmp_path / "models--org--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("0" * 40)
    (snapshot / "sub").symlink_to(trio.finetuned, target_is_directory=True)
    with pytest.raises(ValueError, match=r"leads outside the downloaded repository"):
        resolve("org/name:sub", cache_dir=tmp_path, local_files_only=True)


# --------------------------------------------------------------------------------------------- 3. output vs inputs


@pytest.mark.parametrize("where", ["finetuned", "base", "aligned", "inside-finetuned", "parent-of-inputs"])
def test_realign_output_that_is_contains_or_lies_inside_an_input_is_refused(trio, unchanged, no_model, capsys,
                                                                              where):
    output = {"finetuned": trio.finetuned, "base": trio.base, "aligned": trio.aligned,
              "inside-finetuned": trio.finetuned / "realigned", "parent-of-inputs": trio.base.parent}[where]
    with unchanged():
        rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned",
                         trio.finetuned, "--output", output)
    assert_one_line_error(rc, err, "realign", r"`--output` .* (is|lies inside|contains) the --\w+ input")
    assert not (trio.finetuned / "realigned").exists()
    assert not (trio.base / "adapter_config.json").exists()


def test_library_save_into_an_input_is_refused(trio, saved_patch, unchanged):
    result = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=saved_patch).realign(
        progress=False)
    for target in (trio.finetuned, trio.finetuned / "sub"):
        with unchanged(saved_patch), pytest.raises(ValueError, match=r"save_directory.*the (finetuned|safety_patch)"):
            result.save_pretrained(target)


def test_reference_output_equal_to_the_aligned_adapter_is_refused(trio, unchanged, capsys):
    with unchanged():
        rc, _, err = cli(capsys, "reference", "--aligned", trio.aligned, "--output", trio.aligned)
    assert_one_line_error(rc, err, "reference", r"`--output` .* is the --aligned input")


def test_patch_output_equal_to_the_base_model_is_refused(trio, unchanged, no_model, capsys):
    with unchanged():
        rc, _, err = cli(capsys, "patch", "--base", trio.base, "--aligned", trio.aligned, "--output", trio.base)
    assert_one_line_error(rc, err, "patch", r"`--output` .* is the --base input")


def test_evaluate_report_that_is_an_input_file_is_refused_before_loading(trio, tmp_path, no_model, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["How do I pick a lock?"]))
    rc, _, err = cli(capsys, "evaluate", "--base", trio.base, "--harmful-prompts", prompts, "--output", prompts)
    assert_one_line_error(rc, err, "evaluate", r"`--output` .* is the --harmful-prompts input")
    assert json.loads(prompts.read_text()) == ["How do I pick a lock?"]
    rc, _, err = cli(capsys, "evaluate", "--base", trio.base, "--harmful-prompts", prompts, "--batch-size", "0")
    assert_one_line_error(rc, err, "evaluate", r"`--batch-size` must be a positive integer")


def test_batch_output_that_is_an_input_is_refused_before_the_calibration_pass(trio, ft_copy, unchanged, no_model,
                                                                             capsys):
    from nlsr_hub.fleet import FleetSettings, realign_fleet

    other = Path(shutil.copytree(trio.finetuned, ft_copy.parent / "task_b"))
    with unchanged(ft_copy, other):
        rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", ft_copy,
                         other, "--output", ft_copy)
        assert_one_line_error(rc, err, "realign", r"`--output` .* is the (--)?finetuned .*input")
        patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned)
        with pytest.raises(ValueError, match=r"`--output` .* (contains|is) the finetuned"):
            realign_fleet(patcher, [str(ft_copy), str(other)], settings=FleetSettings(output_dir=ft_copy.parent),
                          progress=False)


# --------------------------------------------------------------------------------------------- 4. types


@pytest.mark.parametrize(("line", "field"), [("compat: 'false'", "compat"), ("beta: true", "beta"),
                                             ("seed: abc", "seed"), ("fraction: '0.5'", "fraction"),
                                             ("max_length: 1.5", "max_length")])
def test_config_values_are_checked_by_type_before_the_calibration_pass(trio, tmp_path, no_model, capsys, line, field):
    config = tmp_path / "config.yaml"
    config.write_text(line + "\n")
    with pytest.raises(TypeError, match=rf"`{field}` must be"):
        NLSRConfig.from_yaml(config.read_text())
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--config", config, "--output", tmp_path / "out")
    assert_one_line_error(rc, err, "realign", rf"config\.yaml.*`{field}` must be")


@pytest.mark.parametrize(("change", "pattern"), [({"patched": "false"}, r"`patched` must be true or false"),
                                                 ({"similarity": 5.0}, r"`similarity` must be a cosine"),
                                                 ({"similarity": float("nan")}, r"`similarity` must be a cosine"),
                                                 ({"neurons_restored": -1}, r"`neurons_restored`"),
                                                 ({"draw": 2}, r"`draw`"),
                                                 ({"surprise": 1}, r"unknown keys \['surprise'\]")])
def test_plan_entries_are_checked_by_type_and_range(saved_result, change, pattern):
    data = json.loads((saved_result / "nlsr_plan.json").read_text())
    data["modules"][0].update(change)
    with pytest.raises((TypeError, ValueError), match=pattern):
        RealignmentPlan.from_dict(data)


# --------------------------------------------------------------------------------------------- 5. one line, exit 2


@pytest.mark.parametrize("content", ["42", "null", '"a string"', "true", '{"unrelated": 1}'])
def test_calibration_json_with_a_scalar_top_level_is_a_one_line_error(trio, tmp_path, no_model, capsys, content):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(content)
    with pytest.raises(ValueError, match=r"calibration\.json holds a JSON"):
        from nlsr_hub import load_calibration

        load_calibration(calibration)
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--calibration", calibration)
    assert_one_line_error(rc, err, "plan", r"calibration\.json holds a JSON")


@pytest.mark.parametrize("content", ["42", "null", '"x"', "[]", '{"format": 1, "modules": 5}'])
def test_patch_json_with_a_wrong_top_level_is_a_one_line_error(trio, patch_copy, capsys, content):
    (patch_copy / "nlsr_safety_patch.json").write_text(content)
    with pytest.raises(AdapterError):
        SafetyPatch.from_pretrained(patch_copy)
    rc, _, err = cli(capsys, "plan", "--safety-patch", patch_copy, "--finetuned", trio.finetuned)
    assert_one_line_error(rc, err, "plan", r"nlsr_safety_patch\.json|Safety patch")


@pytest.mark.parametrize(("content", "pattern"), [
    ("[1, 2]", r"must hold a JSON object \(got list\)"),
    ('{"r": 8, "lora_alpha": 0}', r"`lora_alpha` must be a finite, non-zero number"),
    ('{"r": 8, "lora_alpha": "16"}', r"`lora_alpha` must be"),
    ('{"r": "8", "lora_alpha": 16}', r"`r` must be a positive integer"),
    ('{"r": 8, "lora_alpha": 16, "use_rslora": "yes"}', r"`use_rslora` must be true or false"),
    ('{"r": 8, "lora_alpha": 16, "rank_pattern": {"(": 4}}', r"`rank_pattern` must be"),
    ('{"r": 8, "lora_alpha": 16, "lora_dropout": NaN}', r"`lora_dropout` must be free of NaN"),
], ids=["list", "alpha-zero", "alpha-string", "r-string", "rslora-string", "bad-regex", "nan-passthrough"])
def test_damaged_adapter_config_is_a_one_line_error_before_the_calibration_pass(trio, ft_copy, unchanged, no_model,
                                                                                capsys, content, pattern):
    (ft_copy / "adapter_config.json").write_text(content)
    with unchanged(ft_copy), pytest.raises(AdapterError, match=pattern):
        load_adapter(ft_copy)
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", ft_copy,
                     "--output", ft_copy.parent / "out")
    assert_one_line_error(rc, err, "realign", pattern)


def test_yaml_syntax_error_is_a_one_line_error_naming_the_file(trio, tmp_path, no_model, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("beta: [0.9\nscorer: wanda\n")
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--config", config)
    assert_one_line_error(rc, err, "plan", r"broken\.yaml.*not valid YAML")


@pytest.mark.parametrize("device", ["quantum", "cuda", "cuda:7"])
def test_unusable_device_is_a_one_line_error_before_loading_the_model(trio, no_model, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPU")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--device", device)
    assert_one_line_error(rc, err, "plan", rf"`device` '{device}' is not (available|supported)|Unknown `device`")


def test_unusable_dtype_is_a_one_line_error(trio, no_model, capsys):
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--dtype", "int8")
    assert_one_line_error(rc, err, "plan", r"Unknown `dtype` 'int8'")


@pytest.mark.parametrize("part", ["mask_B", "mask_A", "input_norm"])
def test_patch_mask_of_the_wrong_shape_is_a_one_line_error(trio, patch_copy, capsys, part):
    key = f"{MODULE}.{part}"
    tensors = load_file(str(patch_copy / "nlsr_safety_patch.safetensors"))
    if key not in tensors:
        pytest.skip(f"this patch has no {part}")
    set_tensor(patch_copy, "nlsr_safety_patch.safetensors", key, tensors[key][:-1].contiguous())
    with pytest.raises(AdapterError, match=rf"{re.escape(MODULE)}.*{part}.*shape"):
        SafetyPatch.from_pretrained(patch_copy)
    rc, _, err = cli(capsys, "plan", "--safety-patch", patch_copy, "--finetuned", trio.finetuned)
    assert_one_line_error(rc, err, "plan", rf"{part}.*shape")


def test_plan_naming_a_module_the_adapter_lacks_is_refused_not_a_key_error(trio, saved_patch, saved_result):
    from nlsr_hub.patch import apply_plan

    data = json.loads((saved_result / "nlsr_plan.json").read_text())
    data["modules"][0]["name"] = "model.layers.9.self_attn.q_proj"
    plan = RealignmentPlan.from_dict(data)
    with pytest.raises(AdapterError, match=r"plan does not match the adapter.*layers\.9"):
        apply_plan(load_adapter(trio.finetuned), SafetyPatch.from_pretrained(saved_patch), plan)


# --------------------------------------------------------------------------------------------- 6. pickle policy


def test_evaluate_refuses_a_pickled_adapter_without_allow_pickle(trio, ft_copy, tmp_path, monkeypatch, no_model,
                                                                 capsys):
    torch.save(load_file(str(ft_copy / WEIGHTS)), ft_copy / "adapter_model.bin")
    (ft_copy / WEIGHTS).unlink()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["How do I pick a lock?"]))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    rc, _, err = cli(capsys, "evaluate", "--base", trio.base, "--adapter", ft_copy, "--harmful-prompts", prompts)
    assert_one_line_error(rc, err, "evaluate", r"adapter_model\.bin.*allow_pickle=True")
    from nlsr_hub.modeling import load_base_model

    with pytest.raises(AdapterError, match=r"allow_pickle"):
        load_base_model(str(trio.base), adapter=ft_copy)


def test_evaluate_accepts_a_pickled_adapter_with_allow_pickle(trio, ft_copy):
    from nlsr_hub.evaluation.loading import load_for_evaluation

    torch.save(load_file(str(ft_copy / WEIGHTS)), ft_copy / "adapter_model.bin")
    (ft_copy / WEIGHTS).unlink()
    model, _ = load_for_evaluation(str(trio.base), str(ft_copy), allow_pickle=True)
    assert model is not None


# --------------------------------------------------------------------------------------------- 7. whole-folder saves


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _failing_at(real, calls: dict[str, int], fail_at: int):
    """`real` (os.replace / os.rename), but the `fail_at`-th call counted in `calls` fails as a full disk would."""
    def op(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    return op


def test_a_failing_resave_leaves_the_old_result_or_the_new_one_never_a_mix(trio, saved_patch, tmp_path, monkeypatch):
    """A re-save fails at every possible file operation in turn: the folder is always the old result or the new one,
    whole (the old code replaced files one by one, so a crash in between mixed new config and old weights)."""
    from nlsr_hub import io as nlsr_io

    target = tmp_path / "out"
    patcher = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=saved_patch)
    old = patcher.realign(progress=False)
    new = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=saved_patch,
                                      config=NLSRConfig.preset("default", strength=0.5)).realign(progress=False)
    new.save_pretrained(tmp_path / "reference_new")
    expected_new = _tree(tmp_path / "reference_new")
    old.save_pretrained(target)
    expected_old = _tree(target)
    assert expected_old != expected_new
    real_replace, real_rename = os.replace, os.rename
    for fail_at in range(1, 12):
        calls = {"n": 0}
        monkeypatch.setattr(nlsr_io.os, "replace", _failing_at(real_replace, calls, fail_at))
        monkeypatch.setattr(nlsr_io.os, "rename", _failing_at(real_rename, calls, fail_at))
        try:
            new.save_pretrained(target)
        except OSError:
            pass
        finally:
            monkeypatch.setattr(nlsr_io.os, "replace", real_replace)
            monkeypatch.setattr(nlsr_io.os, "rename", real_rename)
        assert _tree(target) in (expected_old, expected_new), f"mixed folder after a failure at call {fail_at}"
        old.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference_new"]


def test_saving_into_a_folder_with_a_users_readme_is_refused(saved_result, tmp_path, trio, saved_patch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "README.md").write_text("# my notes\n")
    result = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=saved_patch).realign(
        progress=False)
    with pytest.raises(ValueError, match=r"not an nlsr-hub result"):
        result.save_pretrained(target)
    assert (target / "README.md").read_text() == "# my notes\n"


# --------------------------------------------------------------------------------------------- weak: checks first


def test_output_that_is_a_file_is_refused_before_the_calibration_pass(trio, tmp_path, no_model, capsys):
    output = tmp_path / "out.txt"
    output.write_text("not a folder")
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--output", output)
    assert_one_line_error(rc, err, "realign", r"`--output` .*out\.txt is a file")
    assert ".partial" not in err and output.read_text() == "not a folder"


def test_unwritable_output_is_refused_before_the_calibration_pass(trio, tmp_path, no_model, capsys, monkeypatch):
    from nlsr_hub import io as nlsr_io

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(nlsr_io.os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--output", locked / "out")
    assert_one_line_error(rc, err, "realign", r"no write permission in .*locked")


@pytest.mark.parametrize("where", ["folder", "missing-parent-file", "inside-output", "input-file"])
def test_bad_plan_json_path_is_refused_before_the_calibration_pass(trio, tmp_path, no_model, capsys, where):
    (tmp_path / "afile").write_text("x")
    plan_json = {"folder": tmp_path, "missing-parent-file": tmp_path / "afile" / "plan.json",
                 "inside-output": tmp_path / "out" / "plan.json",
                 "input-file": trio.finetuned / "adapter_config.json"}[where]
    rc, _, err = cli(capsys, "realign", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--output", tmp_path / "out", "--plan-json", plan_json)
    assert_one_line_error(rc, err, "realign", r"`--plan-json`")
    assert not (tmp_path / "out").exists()


def test_no_plan_file_is_left_behind_when_the_save_fails(trio, saved_patch, tmp_path, monkeypatch, capsys):
    from nlsr_hub.result import RealignmentResult

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(RealignmentResult, "save_pretrained", disk_full)
    rc, _, err = cli(capsys, "realign", "--safety-patch", saved_patch, "--finetuned", trio.finetuned,
                     "--output", tmp_path / "out", "--plan-json", tmp_path / "plan.json")
    assert_one_line_error(rc, err, "realign", r"No space left")
    assert not (tmp_path / "plan.json").exists()


# --------------------------------------------------------------------------------------------- weak: push


def test_push_uploads_only_the_files_of_a_result_never_dotfiles(saved_result, tmp_path):
    from nlsr_hub.publish import SavedFolder

    folder = Path(shutil.copytree(saved_result, tmp_path / "result"))
    (folder / ".env").write_text("HF_TOKEN=hf_secretSecretSecret\n")
    (folder / "notes.txt").write_text("private\n")
    (folder / ".git").mkdir()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "x.bin").write_bytes(b"\0")
    upload = tmp_path / "upload"
    upload.mkdir()
    SavedFolder(folder)._write_for_hub(upload, "user/x", None)
    assert sorted(p.name for p in upload.iterdir()) == sorted(p.name for p in saved_result.iterdir())
    assert all(not p.name.startswith(".") for p in upload.iterdir())


@pytest.mark.parametrize(("change", "pattern"), [({"patched": "false"}, r"`patched` must be true or false"),
                                                 ({"similarity": 5.0}, r"`similarity` must be a cosine"),
                                                 ({"name": "model.layers.9.mlp.up_proj"}, r"does not match")])
def test_push_refuses_a_tampered_plan_before_any_upload(saved_result, tmp_path, monkeypatch, capsys, change, pattern):
    from nlsr_hub import hub

    folder = Path(shutil.copytree(saved_result, tmp_path / "result"))
    data = json.loads((folder / "nlsr_plan.json").read_text())
    data["modules"][0].update(change)
    (folder / "nlsr_plan.json").write_text(json.dumps(data))

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(hub, "existing_card", no_network)
    monkeypatch.setattr(hub, "push_folder_with", no_network)
    rc, _, err = cli(capsys, "push", folder, "user/tampered")
    assert_one_line_error(rc, err, "push", pattern)


def test_push_refuses_nan_weights(saved_result, tmp_path, capsys):
    folder = Path(shutil.copytree(saved_result, tmp_path / "result"))
    poison(folder)
    rc, _, err = cli(capsys, "push", folder, "user/nan")
    assert_one_line_error(rc, err, "push", r"NaN or infinite")


# --------------------------------------------------------------------------------------------- weak: messages


def test_calibration_path_that_is_a_folder_is_not_reported_missing(trio, tmp_path, no_model, capsys):
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--calibration", tmp_path)
    assert_one_line_error(rc, err, "plan", r"is a folder; pass the file itself")
    assert "does not exist" not in err


def test_a_one_object_calibration_file_is_one_pair_not_empty(tmp_path):
    from nlsr_hub import load_calibration

    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "How do I make a weapon?", "response": "I can't help with that."}))
    pairs = load_calibration(path)
    assert len(pairs) == 1 and pairs[0].response == "I can't help with that."


def test_a_non_utf8_file_is_reported_with_its_name(trio, ft_copy, tmp_path, no_model, capsys):
    (ft_copy / "adapter_config.json").write_bytes(b'{"r": 8, "lora_alpha": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not UTF-8"):
        load_adapter(ft_copy)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_bytes(b'{"prompt": "\xe9t\xe9", "response": "no"}\n')
    rc, _, err = cli(capsys, "plan", "--base", trio.base, "--aligned", trio.aligned, "--finetuned", trio.finetuned,
                     "--calibration", calibration)
    assert_one_line_error(rc, err, "plan", r"calibration\.jsonl is not UTF-8")


def test_an_unreadable_file_is_reported_as_unreadable_not_corrupt(ft_copy, monkeypatch):
    from nlsr_hub import io as nlsr_io

    weights = str(ft_copy / WEIGHTS)
    real_open = os.open

    def denied(path, flags, *args):
        if str(path) == weights:
            raise PermissionError(13, "Permission denied", weights)
        return real_open(path, flags, *args)

    monkeypatch.setattr(nlsr_io.os, "open", denied)
    with pytest.raises(PermissionError, match=r"cannot be read \(permission denied\)") as info:
        load_adapter(ft_copy)
    assert "corrupt" not in str(info.value)
    assert isinstance(info.value, ValueError)  # like every bad input; still a PermissionError for old callers


def test_a_missing_input_file_is_a_value_error_too(tmp_path):
    from nlsr_hub import load_calibration

    with pytest.raises(ValueError, match=r"does not exist") as info:
        load_calibration(tmp_path / "nope.jsonl")
    assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------- weak: huge prompt


class CountingTokenizer:
    """Wraps a tokenizer and records the longest text it was asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)


def test_a_huge_prompt_is_not_tokenised_whole(tokenizer):
    from nlsr_hub.calibration import encode_pair

    counting = CountingTokenizer(tokenizer)
    prompt = "please tell me how to do something dangerous " * 45_000  # ~2M characters
    sample = encode_pair(counting, prompt, "I can't help with that.", max_length=64)
    assert len(sample.input_ids) == 64 and not any(sample.response_mask)  # the pair is dropped, as before
    assert counting.longest < 20_000, counting.longest
    response = "no. " * 50_000  # a huge response: only its first tokens are kept
    sample = encode_pair(counting, "hi", response, max_length=64)
    assert counting.longest < 20_000, counting.longest
    assert len(sample.input_ids) == 64 and any(sample.response_mask)


def test_clipping_keeps_the_tokens_that_tokenising_whole_would_keep(tokenizer):
    from nlsr_hub.calibration import _render, encode_pair

    prompt = "word " * 5000
    response = "answer " * 5000
    for max_length in (16, 128):
        clipped = encode_pair(tokenizer, "short prompt", response, max_length)
        _, full_ids = _render(tokenizer, "short prompt", response)
        assert list(clipped.input_ids) == full_ids[:max_length]
        dropped = encode_pair(tokenizer, prompt, "no", max_length)
        assert not any(dropped.response_mask)

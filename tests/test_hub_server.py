"""The loopback Hub in ``hub_server.py``, driven by the real ``huggingface_hub`` client.

``tests/conftest.py`` sets the Hub environment before anything imports huggingface_hub; the setdefault calls below
only matter if this module is used without it. The server's free port is known only once it starts, after the
client has read ``HF_ENDPOINT``, so the ``hub`` fixture re-points the imported client with
``point_hf_client_at``; huggingface_hub is therefore imported inside the tests, never at module import.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # never the real Hub

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from hub_server import HubServer, git_blob_oid, point_hf_client_at
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, git_blob_oid, point_hf_client_at

TOKEN = "hf_test_write_token"
REPO = "tester/nlsr-adapter"
CARD = """---
license: apache-2.0
library_name: peft
base_model: tiny/base-model
tags:
- nlsr
---
# NLSR adapter

A LoRA adapter used by the Hub round-trip tests.
"""


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A fresh HF_HOME and Hub cache for this test (also used by the client's default cache_dir)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home / "hub"


@pytest.fixture
def hub(hf_cache):
    server = HubServer(valid_tokens={TOKEN})
    with server, point_hf_client_at(server.url):
        yield server


@pytest.fixture
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(token=TOKEN)


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """A small PEFT-style adapter folder: config, ~200 KB safetensors weights and a model card."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny/base-model"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(8, 3200, generator=gen),
               f"{prefix}.lora_B.weight": torch.randn(3200, 8, generator=gen)},
              str(folder / "adapter_model.safetensors"))
    (folder / "README.md").write_text(CARD)
    return folder


def _commit_posts(hub: HubServer) -> list[str]:
    return [path for method, path in hub.requests if method == "POST" and "/commit/" in path]


def test_create_repo_whoami_and_exist_ok(hub, api):
    from huggingface_hub.errors import HfHubHTTPError

    assert api.whoami()["name"] == "tester"
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url == f"{hub.url}/{REPO}"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.repo_exists(REPO) and not api.repo_exists("tester/missing")
    assert hub.get_file(REPO, ".gitattributes").startswith(b"*.safetensors filter=lfs")


def test_upload_folder_is_one_commit_and_downloads_back(hub, api, adapter_dir, hf_cache):
    from huggingface_hub import hf_hub_download, snapshot_download

    api.create_repo(REPO)
    info = api.upload_folder(folder_path=adapter_dir, repo_id=REPO, commit_message="Add adapter")
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert 190_000 < len(weights) < 220_000

    assert len(_commit_posts(hub)) == 1
    assert ("POST", "/api/validate-yaml") in hub.requests  # sent because README.md is part of the commit
    assert [m for m, p in hub.requests if p.startswith("/_lfs/upload/")] == ["PUT"]  # only the weights are LFS
    assert info.oid == hub.head(REPO) and [c.title for c in api.list_repo_commits(REPO)] == [
        "Add adapter", "initial commit"]
    assert hub.get_file(REPO, "adapter_model.safetensors") == weights

    model = api.model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in model.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert siblings["adapter_model.safetensors"].lfs.size == len(weights)
    assert siblings["adapter_config.json"].lfs is None

    only_json = Path(snapshot_download(REPO, allow_patterns=["*.json"]))  # first: the snapshot folder is shared
    assert sorted(p.name for p in only_json.iterdir()) == ["adapter_config.json"]

    path = hf_hub_download(REPO, "adapter_model.safetensors")
    assert Path(path).read_bytes() == weights and str(hf_cache) in path
    from safetensors.torch import load_file

    assert load_file(path)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 3200)
    by_branch = Path(snapshot_download(REPO, revision="main"))
    by_sha = Path(snapshot_download(REPO, revision=info.oid))
    assert by_branch == by_sha and by_branch.name == info.oid
    assert (by_sha / "README.md").read_text() == CARD

    again = api.upload_folder(folder_path=adapter_dir, repo_id=REPO)  # nothing changed: no new commit
    assert again.oid == info.oid and len(_commit_posts(hub)) == 1
    assert hub.unrouted == []


def test_branches_refs_commits_and_tree(hub, api):
    from huggingface_hub import snapshot_download

    first = hub.seed_repo(REPO, {"weights/a.bin": b"\0" * 10, "notes/readme.txt": b"hello"})
    api.create_branch(REPO, branch="feature/dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=REPO, revision="feature/dev")
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
    assert refs["main"] == first and refs["feature/dev"] not in (first, None)
    assert refs["feature/dev"] == hub.head(REPO, "feature/dev")
    assert len(api.list_repo_commits(REPO, revision="feature/dev")) == 3
    assert len(api.list_repo_commits(REPO)) == 2

    assert "dev.txt" in os.listdir(snapshot_download(REPO, revision="feature/dev"))
    assert "dev.txt" not in os.listdir(snapshot_download(REPO, revision=first))

    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO)}
    assert top == {".gitattributes": "RepoFile", "notes": "RepoFolder", "weights": "RepoFolder"}
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "notes/readme.txt", "weights/a.bin"]
    [weights] = api.list_repo_tree(REPO, path_in_repo="weights")
    assert weights.lfs is not None and weights.size == 10
    infos = api.get_paths_info(REPO, ["notes/readme.txt", "weights", "nope"])
    assert [i.path for i in infos] == ["notes/readme.txt", "weights"]
    assert infos[0].blob_id == git_blob_oid(b"hello")

    api.delete_branch(REPO, branch="feature/dev")
    assert [ref.name for ref in api.list_repo_refs(REPO).branches] == ["main"]


def test_upload_folder_create_pr(hub, api, adapter_dir):
    from huggingface_hub import hf_hub_download

    api.create_repo(REPO)
    main_sha = api.upload_folder(folder_path=adapter_dir, repo_id=REPO).oid
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    info = api.upload_folder(folder_path=adapter_dir, repo_id=REPO, create_pr=True, commit_message="Bump r")

    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert hub.head(REPO) == main_sha  # the PR does not move main
    [pr] = api.list_repo_refs(REPO, include_pull_requests=True).pull_requests
    assert pr.ref == "refs/pr/1" and pr.target_commit == info.oid
    in_pr = hf_hub_download(REPO, "adapter_config.json", revision="refs/pr/1")
    assert json.loads(Path(in_pr).read_text())["r"] == 16
    on_main = hf_hub_download(REPO, "adapter_config.json")
    assert json.loads(Path(on_main).read_text())["r"] == 8
    assert ("HEAD", f"/{REPO}/resolve/refs%2Fpr%2F1/adapter_config.json") in hub.requests


def test_model_card_load_and_push_round_trip(hub, api):
    from huggingface_hub import ModelCard

    hub.seed_repo(REPO, {"README.md": CARD.encode()})
    card = ModelCard.load(REPO)
    assert card.data.library_name == "peft" and card.data.tags == ["nlsr"]
    card.data.tags = ["nlsr", "safety"]
    card.text += "\nUpdated by the test.\n"
    card.push_to_hub(REPO, token=TOKEN, commit_message="Update card")

    reloaded = ModelCard.load(REPO)
    assert reloaded.data.tags == ["nlsr", "safety"] and "Updated by the test." in reloaded.text
    assert api.list_repo_commits(REPO)[0].title == "Update card"
    hub.fail_next("validate_yaml", status=400)  # the Hub rejecting the metadata
    with pytest.raises(ValueError):
        reloaded.push_to_hub(REPO, token=TOKEN)
    assert api.list_repo_commits(REPO)[0].title == "Update card"


def test_typed_errors(hub, api):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub.seed_repo(REPO, {"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_commits(REPO, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no/such/folder"))


def test_bad_or_missing_token_is_401(hub, api):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    hub.seed_repo(REPO, {"config.json": b"{}"})
    bad = HfApi(token="hf_not_a_valid_token")
    for call in (bad.whoami, lambda: bad.create_repo("tester/other"), lambda: bad.model_info(REPO),
                 lambda: hf_hub_download(REPO, "config.json", token="hf_not_a_valid_token")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:  # write route, no token at all
        HfApi(token=False).create_repo("tester/other")
    assert err.value.response.status_code == 401
    assert Path(hf_hub_download(REPO, "config.json", token=False)).read_bytes() == b"{}"  # reads need none


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """The client retries failed uploads with sleeps of 1, 2, 4, 8, 8 s: skip the waiting (time.sleep is
    patched process-wide for the test)."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)


@pytest.mark.parametrize("drop", [False, True], ids=["http-500", "dropped-connection"])
def test_failed_lfs_upload_leaves_no_commit(hub, api, adapter_dir, no_backoff_sleep, drop):
    api.create_repo(REPO)
    before = hub.head(REPO)
    hub.fail_next("lfs_upload", count=50, drop=drop)
    with pytest.raises(RuntimeError, match=r"adapter_model\.safetensors"):
        api.upload_folder(folder_path=adapter_dir, repo_id=REPO)
    assert hub.head(REPO) == before and len(api.list_repo_commits(REPO)) == 1
    assert _commit_posts(hub) == [] and hub.lfs_objects == {}
    assert sum(m == "PUT" for m, _ in hub.requests) > 1  # the client retried before giving up

    hub.clear_faults()
    api.upload_folder(folder_path=adapter_dir, repo_id=REPO)
    assert hub.head(REPO) != before


def test_transient_lfs_failure_is_retried(hub, api, adapter_dir, no_backoff_sleep):
    api.create_repo(REPO)
    hub.fail_next("lfs_upload", count=1, drop=True)
    api.upload_folder(folder_path=adapter_dir, repo_id=REPO)
    assert sum(m == "PUT" for m, _ in hub.requests) == 2
    assert hub.get_file(REPO, "adapter_model.safetensors") == (adapter_dir / "adapter_model.safetensors").read_bytes()


def test_failed_commit_call_changes_nothing(hub, api, adapter_dir):
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo(REPO)
    before = hub.head(REPO)
    hub.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=adapter_dir, repo_id=REPO)
    assert err.value.response.status_code == 500
    assert hub.head(REPO) == before and len(_commit_posts(hub)) == 1
    api.upload_folder(folder_path=adapter_dir, repo_id=REPO)  # the LFS object is already there: no new PUT
    assert hub.head(REPO) != before and sum(m == "PUT" for m, _ in hub.requests) == 1


def test_resolve_headers_and_range(hub):
    sha = hub.seed_repo(REPO, {"big.bin": bytes(range(256)) * 8, "small.txt": b"0123456789"})

    def fetch(method: str, path: str, headers: dict | None = None):
        request = urllib.request.Request(f"{hub.url}/{REPO}/resolve/main/{path}", method=method,
                                         headers=headers or {})
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()

    status, headers, body = fetch("HEAD", "big.bin")
    assert status == 200 and body == b"" and headers["Content-Length"] == "2048"
    assert headers["X-Repo-Commit"] == sha and headers["X-Linked-Size"] == "2048"
    assert headers["X-Linked-Etag"].strip('"') == headers["ETag"].strip('"') != git_blob_oid(b"")
    status, headers, body = fetch("GET", "small.txt", {"Range": "bytes=3-5"})
    assert (status, body, headers["Content-Range"]) == (206, b"345", "bytes 3-5/10")
    assert fetch("GET", "small.txt", {"Range": "bytes=-2"})[2] == b"89"
    assert fetch("GET", "small.txt")[1]["ETag"] == f'"{git_blob_oid(b"0123456789")}"'
    with pytest.raises(urllib.error.HTTPError) as err:
        fetch("GET", "small.txt", {"Range": "bytes=50-"})
    assert err.value.code == 416
    with pytest.raises(urllib.error.HTTPError) as err:
        fetch("GET", "absent.txt")
    assert (err.value.code, err.value.headers["X-Error-Code"]) == (404, "EntryNotFound")


def test_dataset_repo(hub, api):
    from huggingface_hub import hf_hub_download

    api.create_repo("tester/prompts", repo_type="dataset")
    api.upload_file(path_or_fileobj=b'{"prompt": "hi"}\n', path_in_repo="data.jsonl", repo_id="tester/prompts",
                    repo_type="dataset")
    path = hf_hub_download("tester/prompts", "data.jsonl", repo_type="dataset")
    assert Path(path).read_bytes() == b'{"prompt": "hi"}\n'
    assert api.dataset_info("tester/prompts").sha == hub.head("tester/prompts", repo_type="dataset")


def test_offline_reads_after_server_stops(hub, api, adapter_dir, hf_cache):
    from huggingface_hub import snapshot_download

    api.create_repo(REPO)
    sha = api.upload_folder(folder_path=adapter_dir, repo_id=REPO).oid
    online = snapshot_download(REPO)
    seen = len(hub.requests)
    hub.stop()

    script = textwrap.dedent(f"""
        import json, os
        from huggingface_hub import ModelCard, hf_hub_download, snapshot_download
        folder = snapshot_download({REPO!r}, local_files_only=True)
        config = hf_hub_download({REPO!r}, "adapter_config.json")
        card = ModelCard.load({REPO!r})
        print(json.dumps({{"folder": folder, "files": sorted(os.listdir(folder)),
                          "r": json.load(open(config))["r"], "license": card.data.license}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_cache.parent), "HF_HUB_CACHE": str(hf_cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["folder"] == online and Path(online).name == sha
    assert result["files"] == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert result["r"] == 8 and result["license"] == "apache-2.0"
    assert len(hub.requests) == seen

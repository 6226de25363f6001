"""Issue #15: ``nlsr webhook`` against the loopback Hub of ``hub_server.py``, with the real huggingface_hub client.

One module-scoped loopback Hub holds the organisation's safety patch (built once from the tiny trio) and one
webhook server (huggingface_hub's `WebhooksServer`, on a free local port) watches ``org/*-lora``. Tests POST
Hub-format webhook payloads (``X-Webhook-Secret``) to it over HTTP and read the Hub's state afterwards: pull
requests, their files, discussions and comments. Nothing is mocked.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_EXPERIMENTAL_WARNING", "1")

import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    from hub_server import HubServer, point_hf_client_at
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, point_hf_client_at

from nlsr_hub import NLSRPatcher, load_adapter
from nlsr_hub.webhook import WebhookSettings
from nlsr_hub.webhook.events import FAILURE_TITLE, MARKER
from nlsr_hub.webhook.jobs import FAILED, JobQueue

pytest.importorskip("gradio")
pytest.importorskip("fastapi")

TOKEN = "hf_webhookWriteToken0123456789abcdef"
SECRET = "webhook-secret-for-tests-0123"
PATCH_REPO = "org/safety-patch"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REALIGNED = {"adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json", "nlsr_config.json",
             "nlsr_similarity.png", "README.md"}


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def event(repo: str, sha: str | None, *, ref: str = "refs/heads/main", scope: str = "repo.content",
          action: str = "update", repo_type: str = "model") -> dict[str, Any]:
    """A webhook payload in the Hub's format (version 3) for a push of `sha` to `ref`."""
    refs = [] if sha is None else [{"ref": ref, "oldSha": "1" * 40, "newSha": sha}]
    return {"event": {"action": action, "scope": scope},
            "repo": {"type": repo_type, "name": repo, "id": f"id-{repo}", "private": False, "headSha": sha,
                     "url": {"web": f"https://hub.invalid/{repo}", "api": f"https://hub.invalid/api/models/{repo}"},
                     "owner": {"id": "id-org"}},
            "updatedRefs": refs, "webhook": {"id": "webhook-1", "version": 3}}


def call(url: str, body: Any = None, *, secret: str | None = SECRET, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_for(world: Any, job_id: int, timeout: float = 180) -> dict:
    """Poll the status endpoint until job `job_id` has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, answer = call(world.url + "/webhooks/status", method="GET")
        assert status == 200
        job = next((j for j in answer["jobs"] if j["id"] == job_id), None)
        if job is not None and job["state"] in ("done", "ignored", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def push(world: Any, repo: str, sha: str, **kwargs: Any) -> dict:
    """POST a push event for `repo`@`sha`, expect it queued, and return the finished job."""
    status, answer = call(world.url + "/webhooks/realign", event(repo, sha, **kwargs))
    assert status == 202, answer
    return wait_for(world, answer["job"])


def files_at(hub: HubServer, repo: str, revision: str = "main") -> dict[str, bytes]:
    with hub.lock:
        return {p: b.data for p, b in hub.repos[("model", repo)].resolve(revision).files.items()}


def seed_adapter(hub: HubServer, repo: str, folder: Path) -> str:
    return hub.seed_repo(repo, {name: (folder / name).read_bytes() for name in ADAPTER_FILES},
                         message="Upload fine-tuned adapter")


class World:
    """The module's loopback Hub, webhook server and fixture folders."""

    def __init__(self, hub: HubServer, webhook: Any, url: str, trio: Any, patch_dir: Path, settings: Any):
        self.hub, self.webhook, self.url, self.trio, self.patch_dir = hub, webhook, url, trio, patch_dir
        self.settings = settings


@pytest.fixture(scope="module")
def world(trio, tmp_path_factory):
    from nlsr_hub.webhook.server import RealignWebhook

    patch_dir = tmp_path_factory.mktemp("webhook") / "patch"
    NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned).safety_patch(progress=False).save_pretrained(patch_dir)
    with HubServer(valid_tokens={TOKEN}) as hub, point_hf_client_at(hub.url):
        hub.seed_repo(PATCH_REPO, {p.name: p.read_bytes() for p in patch_dir.iterdir() if p.is_file()})
        settings = WebhookSettings(safety_patch=PATCH_REPO, secret=SECRET, watch=("org/*-lora",), token=TOKEN,
                                   max_queue=4)
        webhook = RealignWebhook(settings)
        url = webhook.launch(server_name="127.0.0.1", server_port=free_port(), block=False)
        try:
            yield World(hub, webhook, url, trio, patch_dir, settings)
        finally:
            webhook.close()


# ------------------------------------------------------------------------------------------------ the loopback Hub


def test_loopback_hub_discussions_prs_comments_and_merge(world):
    """The endpoints added for the webhook behave as the client expects: one numbering, filters, merge."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api, hub = HfApi(token=TOKEN), world.hub
    hub.seed_repo("other/discuss", {"a.txt": b"a"})
    first = api.create_discussion("other/discuss", "A question", description="why?")
    assert (first.num, first.is_pull_request, [e.content for e in first.events]) == (1, False, ["why?"])
    assert api.comment_discussion("other/discuss", 1, "because").content == "because"
    info = api.create_commit("other/discuss", [CommitOperationAdd("sub/b.txt", b"b")], commit_message="Add b",
                             create_pr=True)
    assert info.pr_num == 2
    hub.seed_repo("other/discuss", {"c.txt": b"main moved on"})
    pulls = list(api.get_repo_discussions("other/discuss", discussion_type="pull_request"))
    assert [(d.num, d.title) for d in pulls] == [(2, "Add b")]
    api.merge_pull_request("other/discuss", 2)
    assert set(files_at(hub, "other/discuss")) == {".gitattributes", "a.txt", "c.txt", "sub/b.txt"}
    assert api.get_discussion_details("other/discuss", 2).status == "merged"
    assert [d.num for d in api.get_repo_discussions("other/discuss", discussion_status="open")] == [1]
    with pytest.raises(Exception, match="401"):
        HfApi(token=False).comment_discussion("other/discuss", 1, "anonymous")


# ------------------------------------------------------------------------------------------------ the webhook


def test_push_opens_a_pull_request_with_the_realigned_adapter_and_card(world):
    hub, trio = world.hub, world.trio
    sha = seed_adapter(hub, "org/task-lora", trio.finetuned)
    job = push(world, "org/task-lora", sha)
    assert job["state"] == "done", job
    pulls = [d for d in hub.discussions("org/task-lora") if d.is_pull_request]
    assert len(pulls) == 1 and job["url"].endswith(f"/org/task-lora/discussions/{pulls[0].num}")
    assert pulls[0].title.startswith(MARKER) and sha[:12] in pulls[0].title
    assert sha in pulls[0].events[0]["data"]["latest"]["raw"]  # the description names the realigned commit
    pr_files, main_files = files_at(hub, "org/task-lora", pulls[0].ref), files_at(hub, "org/task-lora")
    assert {p.split("/", 1)[1] for p in pr_files if p.startswith("nlsr-realigned/")} == REALIGNED
    assert hub.head("org/task-lora") == sha  # main untouched: a person reviews and merges
    for name in ADAPTER_FILES:  # the adapter at the root is left as it was
        assert pr_files[name] == main_files[name] == (trio.finetuned / name).read_bytes()
    card = pr_files["nlsr-realigned/README.md"].decode()
    assert "- nlsr" in card and "PeftModel.from_pretrained(base, 'org/task-lora', subfolder='nlsr-realigned')" in card
    plan = json.loads(pr_files["nlsr-realigned/nlsr_plan.json"])
    assert plan["inputs"]["finetuned"]["commit"] == sha
    assert plan["inputs"]["safety_patch"]["repo_id"] == PATCH_REPO

    # the pull request's adapter is the realignment of this commit with this patch, nothing else
    folder = Path(world.patch_dir).parent / "from_pr"
    folder.mkdir()
    for name in ADAPTER_FILES:
        (folder / name).write_bytes(pr_files[f"nlsr-realigned/{name}"])
    expected = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=world.patch_dir,
                                           config=world.settings.config).realign(progress=False).adapter
    got, finetuned = load_adapter(folder), load_adapter(trio.finetuned)
    assert set(got.modules) == set(expected.modules)
    changed = 0
    for name, module in expected.modules.items():
        assert torch.allclose(got.modules[name].delta(), module.delta(), atol=1e-6)
        changed += not torch.allclose(module.delta(), finetuned.modules[name].delta(), atol=1e-6)
    assert changed > 0


def test_same_commit_twice_gives_one_pull_request_even_after_a_restart(world):
    from huggingface_hub import HfApi

    from nlsr_hub.webhook.actions import run_job

    hub = world.hub
    sha = seed_adapter(hub, "org/twice-lora", world.trio.finetuned)
    first = push(world, "org/twice-lora", sha)
    assert first["state"] == "done"
    status, answer = call(world.url + "/webhooks/realign", event("org/twice-lora", sha))
    assert (status, answer["status"], answer["job"]) == (200, "duplicate", first["id"])
    # a fresh process (no memory of the first job) finds the pull request on the Hub and opens none
    outcome = run_job(HfApi(token=TOKEN), world.settings, "org/twice-lora", sha)
    assert outcome.state == "ignored" and outcome.url == first["url"]
    assert len([d for d in hub.discussions("org/twice-lora") if d.is_pull_request]) == 1


def test_own_pull_request_and_its_merge_never_trigger_another_realignment(world):
    from huggingface_hub import HfApi

    hub = world.hub
    sha = seed_adapter(hub, "org/loop-lora", world.trio.finetuned)
    job = push(world, "org/loop-lora", sha)
    pr = next(d for d in hub.discussions("org/loop-lora") if d.is_pull_request)
    # the Hub reports the server's own pull request commit as an update of refs/pr/N: ignored at once
    status, answer = call(world.url + "/webhooks/realign", event("org/loop-lora", hub.head("org/loop-lora", pr.ref),
                                                                 ref=pr.ref))
    assert (status, answer["status"]) == (200, "ignored") and pr.ref in answer["reason"]
    # a person merges it: main gets a new commit whose root adapter is unchanged -> recognised by its weights
    HfApi(token=TOKEN).merge_pull_request("org/loop-lora", pr.num)
    merged = hub.head("org/loop-lora")
    assert merged != sha and "nlsr-realigned/adapter_model.safetensors" in files_at(hub, "org/loop-lora")
    again = push(world, "org/loop-lora", merged)
    assert again["state"] == "ignored" and "already realigned" in again["detail"] and again["url"] == job["url"]
    assert len([d for d in hub.discussions("org/loop-lora") if d.is_pull_request]) == 1


def test_wrong_or_missing_secret_is_401_and_nothing_happens(world):
    hub = world.hub
    sha = seed_adapter(hub, "org/secret-lora", world.trio.finetuned)
    before_jobs = call(world.url + "/webhooks/status", method="GET")[1]["jobs"]
    before_requests = len(hub.requests)
    for secret in ("wrong-secret", None, SECRET + "x", ""):
        status, answer = call(world.url + "/webhooks/realign", event("org/secret-lora", sha), secret=secret)
        assert status == 401, (secret, answer)
    assert call(world.url + "/webhooks/status", method="GET", secret="wrong")[0] == 401
    assert call(world.url + "/webhooks/status", method="GET", secret=None)[0] == 401
    time.sleep(0.5)
    assert call(world.url + "/webhooks/status", method="GET")[1]["jobs"] == before_jobs
    assert len(hub.requests) == before_requests  # not one Hub request
    assert hub.discussions("org/secret-lora") == []


def test_events_that_are_not_new_adapter_commits_are_ignored_with_a_log_line(world, caplog):
    caplog.set_level(logging.INFO, logger="nlsr_hub.webhook")
    hub = world.hub
    sha = hub.seed_repo("org/readme-lora", {"README.md": b"# not an adapter\n"})
    job = push(world, "org/readme-lora", sha)
    assert job["state"] == "ignored" and "not an adapter repo" in job["detail"]
    cases = {
        "discussion": event("org/readme-lora", sha, scope="discussion", action="create"),
        "comment": event("org/readme-lora", sha, scope="discussion.comment", action="create"),
        "dataset": event("org/data-lora", sha, repo_type="dataset"),
        "not watched": event("someone/else", sha),
        "other branch": event("org/readme-lora", sha, ref="refs/heads/dev"),
        "deleted": event("org/readme-lora", "0" * 40),
    }
    for case, body in cases.items():
        status, answer = call(world.url + "/webhooks/realign", body)
        assert (status, answer["status"]) == (200, "ignored"), case
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("nlsr_hub.webhook")]
    assert sum("ignored event" in m for m in logged) == len(cases)
    assert any("not an adapter repo" in m for m in logged)
    assert hub.discussions("org/readme-lora") == []
    status, answer = call(world.url + "/webhooks/realign", {"not": "a payload"})
    assert status == 422


def test_broken_adapter_posts_the_one_line_error_in_a_discussion(world):
    hub = world.hub
    config = (world.trio.finetuned / "adapter_config.json").read_bytes()
    first = hub.seed_repo("org/broken-lora", {"adapter_config.json": config,
                                              "adapter_model.safetensors": b"\0not safetensors\0" * 64})
    job = push(world, "org/broken-lora", first)
    assert job["state"] == "failed" and "\n" not in job["detail"] and job["detail"]
    discussions = hub.discussions("org/broken-lora")
    assert [(d.title, d.is_pull_request) for d in discussions] == [(FAILURE_TITLE, False)]
    assert job["url"].endswith(f"/org/broken-lora/discussions/{discussions[0].num}")
    comments = [e["data"]["latest"]["raw"] for e in discussions[0].events[1:]]
    assert comments == [f"Realigning commit `{first[:12]}` failed: {job['detail']}"]
    # another broken commit: a second comment in the same discussion; the token appears nowhere
    second = hub.seed_repo("org/broken-lora", {"adapter_model.safetensors": b"still broken" * 64})
    assert push(world, "org/broken-lora", second)["state"] == "failed"
    discussions = hub.discussions("org/broken-lora")
    assert len(discussions) == 1 and len(discussions[0].events) == 3
    assert second[:12] in discussions[0].events[2]["data"]["latest"]["raw"]
    assert TOKEN not in json.dumps([d.events for d in discussions])


def test_status_endpoint_lists_recent_jobs_newest_first(world):
    status, answer = call(world.url + "/webhooks/status", method="GET")
    assert status == 200 and answer["queued"] == 0
    ids = [j["id"] for j in answer["jobs"]]
    assert ids == sorted(ids, reverse=True) and len(ids) >= 1
    assert set(answer["jobs"][0]) == {"id", "repo_id", "sha", "state", "detail", "url", "received", "finished"}
    assert TOKEN not in json.dumps(answer) and SECRET not in json.dumps(answer)


def test_destination_repo_commits_to_a_new_repo_once(world):
    from huggingface_hub import HfApi

    from nlsr_hub.webhook.actions import run_job

    hub = world.hub
    settings = WebhookSettings(safety_patch=PATCH_REPO, secret=SECRET, watch=("org/*",), token=TOKEN,
                               destination="repo", repo_template="{namespace}/{name}-nlsr")
    sha = seed_adapter(hub, "org/copy-lora", world.trio.finetuned)
    api = HfApi(token=TOKEN)
    outcome = run_job(api, settings, "org/copy-lora", sha)
    assert outcome.state == "done", outcome
    target = files_at(hub, "org/copy-lora-nlsr")
    assert set(target) >= REALIGNED
    assert hub.repos[("model", "org/copy-lora-nlsr")].resolve("main").title.startswith(MARKER)
    assert run_job(api, settings, "org/copy-lora", sha).state == "ignored"  # idempotent
    own = run_job(api, settings, "org/copy-lora-nlsr", hub.head("org/copy-lora-nlsr"))  # its own output
    assert own.state == "ignored" and "nlsr result" in own.detail
    assert len(hub.repos[("model", "org/copy-lora-nlsr")].commits) == 2  # initial commit + one realignment


# ------------------------------------------------------------------------------------------------ queue and settings


def test_jobs_run_one_at_a_time_from_a_bounded_queue():
    release, running, peak, lock = threading.Event(), [0], [0], threading.Lock()

    def handler(job):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return "done", "ok", None

    jobs = JobQueue(handler, max_queue=2, history=10)
    jobs.start()
    try:
        jobs.submit("org/a", "a" * 40)
        deadline = time.monotonic() + 10
        while running[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        jobs.submit("org/b", "b" * 40)
        jobs.submit("org/c", "c" * 40)
        with pytest.raises(queue.Full):  # two waiting: the burst is refused, not buffered
            jobs.submit("org/d", "d" * 40)
        assert jobs.submit("org/b", "b" * 40)[1] is False  # already queued: not twice
        release.set()
        assert jobs.wait_idle(10)
    finally:
        release.set()
        jobs.stop()
    assert peak[0] == 1
    assert [j["state"] for j in jobs.snapshot()] == ["done", "done", "done"]
    assert jobs.submit("org/d", "d" * 40)[1] is True  # room again (the worker is stopped: it stays queued)


def test_full_queue_answers_503_and_records_nothing():
    from nlsr_hub.webhook.server import RealignWebhook

    gate = threading.Event()

    class SlowWebhook(RealignWebhook):
        def _run(self, job):  # a slow job, without the Hub
            gate.wait(10)
            return "done", "", None

    webhook = SlowWebhook(WebhookSettings(safety_patch=PATCH_REPO, secret=SECRET, max_queue=1))
    webhook.jobs.start()
    try:
        first = webhook.handle(SECRET, event("org/q-lora", "a" * 40))
        deadline = time.monotonic() + 10
        while webhook.jobs.snapshot()[0]["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        codes = [first[0]] + [webhook.handle(SECRET, event("org/q-lora", c * 40))[0] for c in "bcd"]
        assert codes == [202, 202, 503, 503]  # one running, one waiting, the rest refused
        assert [j["sha"][0] for j in webhook.jobs.snapshot()] == ["b", "a"]
    finally:
        gate.set()
        webhook.jobs.stop()


def test_failed_job_may_be_retried_but_a_done_one_not():
    jobs = JobQueue(lambda job: (FAILED, "boom", None), max_queue=2, history=5)
    jobs.start()
    try:
        job, _ = jobs.submit("org/a", "a" * 40)
        assert jobs.wait_idle(10) and job.state == FAILED
        assert jobs.submit("org/a", "a" * 40)[1] is True
    finally:
        jobs.stop()


@pytest.mark.parametrize(("changes", "message"), [
    ({"secret": ""}, "secret"),
    ({"watch": ()}, "watch"),
    ({"destination": "email"}, "destination"),
    ({"subfolder": "../up"}, "subfolder"),
    ({"repo_template": "{repo}"}, "repo_template"),
    ({"repo_template": "{user}/x"}, "repo_template"),
    ({"max_queue": 0}, "max_queue"),
])
def test_settings_refuse_bad_values(changes, message):
    arguments = {"safety_patch": PATCH_REPO, "secret": SECRET, **changes}
    with pytest.raises(ValueError, match=message):
        WebhookSettings(**arguments)


def test_settings_hide_secret_and_token_and_match_patterns():
    settings = WebhookSettings(safety_patch=PATCH_REPO, secret=SECRET, token=TOKEN, watch=("org/*-lora", "me/x"))
    assert SECRET not in repr(settings) and TOKEN not in repr(settings)
    assert settings.watches("org/task-lora") and settings.watches("me/x")
    assert not settings.watches("org/task-lora-nlsr") and not settings.watches("me/xy")
    assert settings.target_repo("org/task") == "org/task-nlsr"


# ------------------------------------------------------------------------------------------------ command line


def test_cli_flags_become_settings(monkeypatch):
    from nlsr_hub.cli import build_parser, config_from_args
    from nlsr_hub.webhook.command import webhook_settings_from_args

    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    args = build_parser().parse_args(["webhook", "--safety-patch", PATCH_REPO, "--watch", "org/*-lora", "me/x",
                                      "--to", "repo", "--repo-template", "{namespace}/{name}-safe", "--max-queue",
                                      "3", "--restorer", "addback", "--strength", "0.5"])
    settings = webhook_settings_from_args(args, config_from_args(args))
    assert (settings.secret, settings.watch, settings.destination, settings.max_queue) == (
        SECRET, ("org/*-lora", "me/x"), "repo", 3)
    assert settings.target_repo("org/task") == "org/task-safe"
    assert (settings.config.restorer, settings.config.strength) == ("addback", 0.5)
    args = build_parser().parse_args(["webhook", "--safety-patch", PATCH_REPO, "--watch", "*", "--secret", "flag"])
    assert webhook_settings_from_args(args, config_from_args(args)).secret == "flag"


def test_cli_without_a_secret_exits_2_with_one_line(monkeypatch, capsys):
    from nlsr_hub.cli import main

    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    assert main(["webhook", "--safety-patch", PATCH_REPO, "--watch", "org/*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "secret" in err and "WEBHOOK_SECRET" in err


def test_cli_checks_the_safety_patch_before_serving(tmp_path, capsys):
    from nlsr_hub.cli import main

    missing = tmp_path / "no-patch"
    assert main(["webhook", "--safety-patch", str(missing), "--watch", "*", "--secret", "s", "--port",
                 str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlsr webhook: error:") and err.count("\n") == 1


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_serves_until_stopped_and_opens_the_pull_request(world, tmp_path, stop):
    """`nlsr webhook` in a subprocess (secret and token from the environment, never on the command line), stopped
    by Ctrl-C (SIGINT) or as a container stops it (SIGTERM): exit 0 after a clean shutdown."""
    import signal
    import subprocess
    import sys

    hub = world.hub
    repo = f"org/cli-{stop.lower()}-lora"
    sha = seed_adapter(hub, repo, world.trio.finetuned)
    port = free_port()
    env = {**os.environ, "WEBHOOK_SECRET": SECRET, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url,
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # a hung server shows its threads' stacks (below)
    command = [sys.executable, "-m", "nlsr_hub.cli", "webhook", "--safety-patch", PATCH_REPO, "--watch", "org/cli-*",
               "--port", str(port)]
    # the server's own default SIGINT handling, whatever this process inherited (a run in the background ignores it)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(url + "/webhooks/status", method="GET")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.5)
        status, answer = call(url + "/webhooks/realign", event(repo, sha))
        assert status == 202
        cli = type("CliWorld", (), {"url": url})()
        job = wait_for(cli, answer["job"])
        assert job["state"] == "done", job
        assert [d.title[:len(MARKER)] for d in hub.discussions(repo)] == [MARKER]
    finally:
        process.send_signal(getattr(signal, stop))
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack, then the process ends
            try:
                output = process.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()[0]
    assert process.returncode == 0, output  # stops cleanly
    assert TOKEN not in output and SECRET not in output
    assert "queued job" in output and repo in output  # the INFO log lines of the decisions

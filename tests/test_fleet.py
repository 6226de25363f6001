"""Issue #14, fleet mode: a fleet of tiny adapters (some deliberately broken) through both engines with the same bytes
out; Hub input (a paged listing) and output (one commit per adapter, or a pull request) through the loopback Hub with
the real client; resume after an interrupted run. Ray runs in one local session for the module (2 CPUs, a small
object store), started after the loopback Hub so that its workers inherit the Hub's address and a token of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    from hub_server import HubServer, point_hf_client_at
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, point_hf_client_at

from nlsr_hub import NLSRConfig, NLSRPatcher, load_adapter
from nlsr_hub.cli import main
from nlsr_hub.fleet import FleetSettings, collect_specs, realign_fleet
from nlsr_hub.fleet.inputs import assign_names, check_push_template

TOKEN = "hf_fleetIntegrationSecretToken0123456789"
GOOD = ("ft0", "ft1", "ft2", "ft3")
BROKEN = {  # adapter name -> what its error row must say
    "corrupt": "corrupt or truncated",
    "pickled": "pickled weights",
    "wrong-base": "different base models",
    "not-an-adapter": "is not a PEFT adapter",
    "missing": "no such local folder",
}
RESULT_FILES = {"adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json", "nlsr_config.json",
                "nlsr_similarity.png", "README.md"}
ROW_KEYS = ("name", "spec", "status", "modules_patched", "modules_total", "neurons_restored", "mean_similarity",
            "error", "input")


# ------------------------------------------------------------------------------------------------ helpers


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def results_tree(root: Path) -> dict[str, str]:
    """sha256 of every result file under `root` by relative path (the summaries left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent != root}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def rows_by_name(folder: Path) -> dict[str, dict]:
    return {row["name"]: row for row in summary(folder)["adapters"]}


def files_at(hub: HubServer, repo: str, revision: str = "main") -> dict[str, bytes]:
    with hub.lock:
        return {path: blob.data for path, blob in hub.repos[("model", repo)].resolve(revision).files.items()}


def commits_on_main(hub: HubServer, repo: str) -> int:
    with hub.lock:
        return len(hub.repos[("model", repo)].history(hub.head(repo)))


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fleet(trio, tmp_path_factory) -> SimpleNamespace:
    """A saved safety patch of the trio and a folder of tiny adapters: four good ones (the trio's fine-tuned adapter,
    perturbed) and four broken (corrupt weights, pickled weights only, another base model, no adapter at all); the
    list file adds a folder that does not exist."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("fleet")
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned)
    patch = patcher.safety_patch(progress=False).save_pretrained(root / "patch")
    config = json.loads((trio.finetuned / "adapter_config.json").read_text())
    tensors = load_file(str(trio.finetuned / "adapter_model.safetensors"))
    adapters = root / "adapters"
    for i, name in enumerate(GOOD):
        generator = torch.Generator().manual_seed(100 + i)
        write_adapter(adapters / name, config,
                      {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()})
    corrupt = write_adapter(adapters / "corrupt", config, tensors)
    (corrupt / "adapter_model.safetensors").write_bytes((corrupt / "adapter_model.safetensors").read_bytes()[:200])
    pickled = write_adapter(adapters / "pickled", config, tensors)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    write_adapter(adapters / "wrong-base", {**config, "base_model_name_or_path": "other-org/other-model"}, tensors)
    (adapters / "not-an-adapter").mkdir()
    list_file = root / "adapters.txt"
    list_file.write_text(f"# the fleet\n{adapters / 'ft0'}\n\n{root / 'gone' / 'missing'}   # deleted\n")
    return SimpleNamespace(root=root, patch=patch, adapters=adapters, list_file=list_file, config=config,
                           tensors=tensors)


@pytest.fixture(scope="module")
def hub(fleet) -> HubServer:
    """The loopback Hub: adapter repos org/task-ft0, org/task-ft1, org/task-corrupt, the safety patch and a repo that is
    no adapter; listings come in pages of two."""
    server = HubServer(valid_tokens={TOKEN})
    with server, point_hf_client_at(server.url):
        def files(folder: Path) -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in folder.iterdir()}

        for name in ("ft0", "ft1", "corrupt"):
            server.seed_repo(f"org/task-{name}", files(fleet.adapters / name), message="Customer adapter")
        server.seed_repo("org/safety-patch", files(fleet.patch))
        server.seed_repo("org/base-model", {"config.json": b"{}"})
        server.listing_page_size = 2
        yield server


@pytest.fixture(scope="module")
def ray_session(hub):
    """A local Ray for this module. Its workers inherit HF_ENDPOINT (the loopback Hub) and HF_TOKEN from the
    environment they are started with: a token is never sent in task arguments."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hub.url)
        env.setenv("HF_TOKEN", TOKEN)
        for timeout in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):  # a loaded test machine answers slowly
            env.setenv(timeout, "120")
        ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------------ 1. both engines, same bytes


def test_fleet_of_tiny_adapters_gives_the_same_bytes_on_both_engines(fleet, ray_session, tmp_path, capsys):
    flags = ["--safety-patch", fleet.patch, "--finetuned-list", fleet.list_file, "--finetuned-glob",
             f"{fleet.adapters}/*"]
    rc, out, err = cli(capsys, "realign", *flags, "--output", tmp_path / "seq")
    assert rc == 1, err  # some adapters failed, the fleet went on
    assert "adapters/min" in err and "9/9" in err  # one progress bar over the adapters, with its throughput
    assert "4 realigned, 0 up to date, 5 failed" in out.splitlines()
    rc, _, err = cli(capsys, "realign", *flags, "--output", tmp_path / "ray", "--engine", "ray",
                     "--ray-num-cpus", "0.5")  # more tasks than cores at once: the same bytes
    assert rc == 1, err

    seq, on_ray = summary(tmp_path / "seq"), summary(tmp_path / "ray")
    assert (seq["engine"], on_ray["engine"]) == ("sequential", "ray")
    assert seq["counts"] == on_ray["counts"] == {"realigned": 4, "up to date": 0, "planned": 0, "failed": 5,
                                                 "pending": 0}
    rows = rows_by_name(tmp_path / "seq")
    assert sorted(rows) == sorted([*GOOD, *BROKEN])
    for name in GOOD:
        assert rows[name]["status"] == "realigned" and rows[name]["modules_total"] == 14, rows[name]
        assert rows[name]["input"]["sha256"] and rows[name]["output"] == str(tmp_path / "seq" / name)
    for name, message in BROKEN.items():
        assert rows[name]["status"] == "failed" and message in rows[name]["error"], rows[name]
    ray_rows = rows_by_name(tmp_path / "ray")
    assert {n: [r[k] for k in ROW_KEYS] for n, r in rows.items()} == {
        n: [r[k] for k in ROW_KEYS] for n, r in ray_rows.items()}

    sequential_tree = results_tree(tmp_path / "seq")
    # the Ray run's visibility marker is gone: both folders hold the same names
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "seq").iterdir())
    assert {Path(p).parts[0] for p in sequential_tree} == set(GOOD)  # no folder for a failed adapter
    assert {Path(p).name for p in sequential_tree} == RESULT_FILES
    assert sequential_tree == results_tree(tmp_path / "ray")

    # each result is the single-adapter realignment of that adapter
    for name in GOOD:
        direct = NLSRPatcher.from_pretrained(None, finetuned=fleet.adapters / name, safety_patch=fleet.patch)
        expected = direct.realign(progress=False).adapter
        written = load_adapter(tmp_path / "seq" / name)
        for module, got in written.modules.items():
            assert torch.allclose(got.A, expected.modules[module].A, atol=1e-6), (name, module)
            assert torch.allclose(got.B, expected.modules[module].B, atol=1e-6), (name, module)
    table = (tmp_path / "seq" / "summary.md").read_text()
    assert sum(line.startswith("| `") for line in table.splitlines()) == 9
    assert "(4 realigned, 0 up to date, 5 failed)" in table


def test_a_ray_worker_that_does_not_see_the_output_folder_reports_it_in_the_row(tmp_path):
    from nlsr_hub.fleet.engines import _ray_task, unseen_output, visibility_marker
    from nlsr_hub.fleet.work import FleetSettings, FleetTarget

    settings = FleetSettings(output_dir=tmp_path / "out")
    with visibility_marker(settings) as marker:
        name, token = marker
        assert (tmp_path / "out" / name).read_text() == token and name.startswith(".nlsr-fleet-")
        assert unseen_output(settings, marker) is None  # the driver's own node sees it
        elsewhere = FleetSettings(output_dir=tmp_path / "node-local")  # what another node's worker would see
        row = _ray_task(FleetTarget(0, "some/adapter", "adapter"), [None], elsewhere, 1, marker)
        assert row["status"] == "failed" and "every node sees" in row["error"] and "--push-to-hub" in row["error"]
        (tmp_path / "out" / name).write_text("another fleet")
        assert "not the driver's" in unseen_output(settings, marker)
    assert not list((tmp_path / "out").iterdir())  # removed at the end
    for nothing_local in (FleetSettings(), FleetSettings(output_dir=tmp_path / "dry", dry_run=True)):
        with visibility_marker(nothing_local) as marker:
            assert marker is None and unseen_output(nothing_local, None) is None
    assert not (tmp_path / "dry").exists()


def test_a_relative_output_folder_is_made_absolute_for_every_worker(fleet, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned-glob", f"{fleet.adapters}/ft*",
                     "--output", "out")
    assert rc == 0, err
    outputs = {row["output"] for row in rows_by_name(tmp_path / "out").values()}
    assert outputs == {str(tmp_path / "out" / name) for name in GOOD}


def test_a_killed_ray_fleets_visibility_marker_is_no_reason_to_refuse_the_folder(fleet, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nlsr-fleet-0123456789abcdef").write_text("0123456789abcdef")
    (out / "..nlsr-fleet-0123456789abcdef.x1y2.tmp").write_text("")
    rc, _, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned-glob", f"{fleet.adapters}/ft*",
                     "--output", out)
    assert rc == 0, err


# ------------------------------------------------------------------------------------ 2. resume


def test_resume_after_an_interrupted_run(fleet, ray_session, tmp_path, monkeypatch):
    from nlsr_hub.fleet import engines

    ft0 = Path(shutil.copytree(fleet.adapters / "ft0", tmp_path / "inputs" / "ft0"))
    specs = [str(ft0), *(str(fleet.adapters / n) for n in GOOD[1:]), str(fleet.adapters / "corrupt")]
    out = tmp_path / "out"

    def run(**kwargs):
        config = kwargs.pop("config", None)
        patcher = NLSRPatcher.from_pretrained(None, safety_patch=fleet.patch, config=config)
        return realign_fleet(patcher, specs, settings=FleetSettings(output_dir=kwargs.pop("output", out),
                                                                    resume=kwargs.pop("resume", True)),
                             progress=False, **kwargs)

    run(output=tmp_path / "uninterrupted")
    real, calls = engines.realign_one, []

    def interrupted(target, *args, **kwargs):
        calls.append(target.name)
        if len(calls) == 3:  # killed while saving ft2: its staging folder and lock file stay behind
            (out / f".{target.name}.nlsr-0123abcd.partial").mkdir()
            (out / f".{target.name}.nlsr-lock").touch()
            raise KeyboardInterrupt
        return real(target, *args, **kwargs)

    monkeypatch.setattr(engines, "realign_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert [r["status"] for r in summary(out)["adapters"]] == ["realigned", "realigned", "pending", "pending",
                                                                "pending"]  # the summary records what finished
    weights_mtime = (out / "ft0" / "adapter_model.safetensors").stat().st_mtime_ns

    report = run()
    assert [r["status"] for r in report.rows] == ["up to date", "up to date", "realigned", "realigned", "failed"]
    assert (out / "ft0" / "adapter_model.safetensors").stat().st_mtime_ns == weights_mtime  # not rewritten
    assert sorted(p.name for p in out.iterdir()) == [*GOOD, "summary.json", "summary.md"]  # leftovers removed
    assert results_tree(out) == results_tree(tmp_path / "uninterrupted")

    # the Ray engine sees the same results as up to date
    assert [r["status"] for r in run(engine="ray").rows] == ["up to date"] * 4 + ["failed"]
    # a changed input is realigned again, and only that one
    tensors = {k: v * 1.01 for k, v in fleet.tensors.items()}
    shutil.rmtree(ft0)
    write_adapter(ft0, fleet.config, tensors)
    assert [r["status"] for r in run().rows] == ["realigned"] + ["up to date"] * 3 + ["failed"]
    # another config (or patch) makes every result stale; resume=False realigns everything
    strength = NLSRConfig.from_dict({**NLSRConfig.preset("default").to_dict(), "strength": 0.5})
    assert [r["status"] for r in run(config=strength).rows] == ["realigned"] * 4 + ["failed"]
    assert [r["status"] for r in run(config=strength, resume=False).rows] == ["realigned"] * 4 + ["failed"]


def ray_workers_running(raylet: int, function: str) -> list[int]:
    """PIDs of this Ray's worker processes (children of its raylet) now running `function`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent == raylet and title.startswith(f"ray::{function}"):
            found.append(int(stat.parent.name))
    return found


def test_a_killed_ray_worker_loses_nothing_that_finished_and_a_rerun_resumes(fleet, ray_session, tmp_path,
                                                                             monkeypatch):
    import threading

    from nlsr_hub.fleet import engines

    def parent_of_worker() -> int:
        return os.getppid()

    ray = ray_session
    raylet = ray.get(ray.remote(parent_of_worker).remote())  # this Ray's raylet: the parent of its workers
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    shutil.copyfile(fleet.adapters / "ft0" / "adapter_model.safetensors", stuck / "adapter_model.safetensors")
    os.mkfifo(stuck / "adapter_config.json")  # reading it blocks: the task is still running when its worker dies
    specs = [str(stuck), *(str(fleet.adapters / n) for n in GOOD[1:])]
    out = tmp_path / "out"
    monkeypatch.setattr(engines, "RAY_RETRIES", 0)  # no retry: the killed task becomes its adapter's error row
    killed: list[int] = []

    def kill_the_stuck_worker() -> None:
        for _ in range(1200):  # up to 10 minutes on a loaded machine
            if all((out / n / "nlsr_plan.json").is_file() for n in GOOD[1:]):  # the others are done
                running = ray_workers_running(raylet, "_ray_task")
                if running:
                    os.kill(running[0], 9)
                    killed.append(running[0])
                    return
            threading.Event().wait(0.5)

    killer = threading.Thread(target=kill_the_stuck_worker, daemon=True)
    killer.start()
    patcher = NLSRPatcher.from_pretrained(None, safety_patch=fleet.patch)
    report = realign_fleet(patcher, specs, settings=FleetSettings(output_dir=out), engine="ray", progress=False)
    killer.join(timeout=5)
    assert len(killed) == 1
    rows = {row["name"]: row for row in report.rows}
    assert rows["stuck"]["status"] == "failed" and "the Ray task failed" in rows["stuck"]["error"]
    assert [rows[n]["status"] for n in GOOD[1:]] == ["realigned"] * 3
    assert sorted(p.name for p in out.iterdir()) == [*GOOD[1:], "summary.json", "summary.md"]

    (stuck / "adapter_config.json").unlink()
    shutil.copyfile(fleet.adapters / "ft0" / "adapter_config.json", stuck / "adapter_config.json")
    rerun = realign_fleet(NLSRPatcher.from_pretrained(None, safety_patch=fleet.patch), specs,
                          settings=FleetSettings(output_dir=out), engine="ray", progress=False)
    assert [row["status"] for row in rerun.rows] == ["realigned"] + ["up to date"] * 3


# ------------------------------------------------------------------------------------ 3. Hub in and out


def test_fleet_from_a_hub_listing_pushes_one_commit_per_adapter_and_resumes(hub, fleet, tmp_path, capsys):
    flags = ["--safety-patch", "org/safety-patch", "--finetuned", "org/gone-adapter", "--push-to-hub",
             "org/{name}-nlsr", "--token", TOKEN, "--output", tmp_path / "summary", "--cache-dir", tmp_path / "cache"]
    rc, out, err = cli(capsys, "realign", *flags, "--finetuned-hub", "org/task-")
    assert rc == 1, err
    assert TOKEN not in out + err + (tmp_path / "summary" / "summary.json").read_text()
    rows = rows_by_name(tmp_path / "summary")
    assert sorted(rows) == ["gone-adapter", "task-corrupt", "task-ft0", "task-ft1"]
    assert rows["task-corrupt"]["status"] == "failed" and "corrupt" in rows["task-corrupt"]["error"]
    assert rows["gone-adapter"]["status"] == "failed" and "not found" in rows["gone-adapter"]["error"]
    patch_sha = summary(tmp_path / "summary")["patch_sha256"]
    for name in ("task-ft0", "task-ft1"):
        repo = f"org/{name}-nlsr"
        assert rows[name]["status"] == "realigned" and f"/{repo}/commit/" in rows[name]["output"]
        assert commits_on_main(hub, repo) == 2  # the repo's initial commit and one upload
        files = files_at(hub, repo)
        assert set(files) == RESULT_FILES | {".gitattributes"}
        inputs = json.loads(files["nlsr_plan.json"])["inputs"]
        assert inputs["finetuned"]["commit"] == hub.head(f"org/{name}")
        assert inputs["safety_patch"]["commit"] == hub.head("org/safety-patch")
        assert inputs["safety_patch"]["sha256"] == patch_sha
    assert sorted(os.listdir(tmp_path / "summary")) == ["summary.json", "summary.md"]  # results went to the Hub

    # the whole organisation: the pushed results are not inputs, and nothing up to date is pushed again
    rc, out, err = cli(capsys, "realign", *flags, "--finetuned-hub", "org")
    rows = rows_by_name(tmp_path / "summary")
    assert sorted(rows) == ["gone-adapter", "task-corrupt", "task-ft0", "task-ft1"]
    assert rows["task-ft0"]["status"] == rows["task-ft1"]["status"] == "up to date"
    assert commits_on_main(hub, "org/task-ft0-nlsr") == commits_on_main(hub, "org/task-ft1-nlsr") == 2


def test_hub_fleet_401_stays_with_its_adapter_and_create_pr_opens_a_pull_request(hub, fleet, tmp_path, capsys):
    hub.fail_next("info", status=401)  # the first adapter's first request
    rc, out, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned", "org/task-ft0", "org/task-ft1",
                       "--push-to-hub", "org/{name}-pr", "--create-pr", "--token", TOKEN, "--output", tmp_path / "s",
                       "--cache-dir", tmp_path / "cache")
    assert rc == 1, err
    rows = rows_by_name(tmp_path / "s")
    assert rows["task-ft0"]["status"] == "failed" and "401" in rows["task-ft0"]["error"], rows["task-ft0"]
    assert rows["task-ft1"]["status"] == "realigned" and rows["task-ft1"]["output"].endswith("/discussions/1")
    assert TOKEN not in out + err + (tmp_path / "s" / "summary.md").read_text()
    assert set(files_at(hub, "org/task-ft1-pr")) == {".gitattributes"}  # main untouched
    assert set(files_at(hub, "org/task-ft1-pr", "refs/pr/1")) == RESULT_FILES | {".gitattributes"}
    assert [d.is_pull_request for d in hub.discussions("org/task-ft1-pr")] == [True]


def test_ray_fleet_pulls_and_pushes_through_the_hub_with_the_workers_own_token(hub, fleet, ray_session, tmp_path):
    cache = tmp_path / "cache"
    specs = ["org/task-ft0", "org/task-ft1"]

    def push(template: str, engine: str):
        patcher = NLSRPatcher.from_pretrained(None, safety_patch="org/safety-patch", cache_dir=cache)
        settings = FleetSettings(output_dir=tmp_path / engine, push_to=template, hub_kwargs={"cache_dir": cache})
        token = TOKEN if engine == "sequential" else None  # Ray workers use their own HF_TOKEN
        return realign_fleet(patcher, specs, settings=settings, engine=engine, token=token, progress=False)

    for template, engine in (("org/{name}-seq", "sequential"), ("org/{name}-ray", "ray")):
        rows = push(template, engine).rows
        assert [r["status"] for r in rows] == ["realigned"] * 2, rows
    for name in ("task-ft0", "task-ft1"):
        assert commits_on_main(hub, f"org/{name}-ray") == 2
        on_ray, sequential = files_at(hub, f"org/{name}-ray"), files_at(hub, f"org/{name}-seq")
        for file in RESULT_FILES - {"README.md"}:  # the card names its own repo
            assert on_ray[file] == sequential[file], (name, file)

    patcher = NLSRPatcher.from_pretrained(None, safety_patch="org/safety-patch", cache_dir=cache)
    with pytest.raises(ValueError, match="HF_TOKEN") as caught:
        realign_fleet(patcher, specs, settings=FleetSettings(output_dir=tmp_path / "t"), engine="ray", token=TOKEN)
    assert TOKEN not in str(caught.value)


# ------------------------------------------------------------------------------------ 4. inputs and refusals


def test_fleet_inputs_names_and_templates(fleet, tmp_path):
    specs = collect_specs([str(fleet.adapters / "ft1")], list_files=[fleet.list_file],
                          globs=[f"{fleet.adapters}/ft*"])
    assert specs == [str(fleet.adapters / n) for n in ("ft1", "ft0")] + [str(fleet.root / "gone" / "missing")] + [
        str(fleet.adapters / n) for n in ("ft2", "ft3")]  # in order, each once
    assert assign_names(specs) == ["ft1", "ft0", "missing", "ft2", "ft3"]
    with pytest.raises(ValueError, match="matches no folder"):
        collect_specs(globs=[f"{tmp_path}/nothing-*"])
    with pytest.raises(ValueError, match=r"same result name \(ft0: .*ft0, .*ft0\)"):
        assign_names([str(fleet.adapters / "ft0"), str(tmp_path / "other" / "ft0")])
    with pytest.raises(ValueError, match=r"one '\{name\}'"):
        check_push_template("org/realigned", ["ft0"])
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        check_push_template("org/{name}--bad", ["ft0"])


def test_fleet_refuses_an_output_folder_with_user_files_before_any_work(fleet, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned-glob", f"{fleet.adapters}/ft*",
                     "--output", out)
    assert rc == 2 and "notes.txt" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    rc, out_text, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned-glob",
                            f"{fleet.adapters}/ft*", "--output", tmp_path / "planned", "--dry-run")
    assert rc == 0, err
    assert "0 realigned, 0 up to date, 0 failed, 4 planned" in out_text.splitlines()
    assert not (tmp_path / "planned").exists()  # a dry run writes nothing


@pytest.mark.parametrize(("flags", "message"), [
    (["--ray-num-cpus", "0.5"], "`ray_num_cpus` (`--ray-num-cpus`) needs `engine='ray'`"),
    (["--ray-address", "auto"], "`ray_address` (`--ray-address`) needs `engine='ray'`"),
])
def test_ray_options_without_the_ray_engine_are_refused_before_any_work(fleet, tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "realign", "--safety-patch", fleet.patch, "--finetuned-glob", f"{fleet.adapters}/ft*",
                     "--output", tmp_path / "out", *flags)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cpus", [0, -1, float("nan"), True])
def test_ray_num_cpus_must_be_a_positive_number(fleet, tmp_path, cpus):
    patcher = NLSRPatcher.from_pretrained(None, safety_patch=fleet.patch)
    with pytest.raises(ValueError, match="must be a positive number of CPUs per adapter task"):
        realign_fleet(patcher, [str(fleet.adapters / "ft0")], settings=FleetSettings(output_dir=tmp_path / "o"),
                      engine="ray", ray_num_cpus=cpus, progress=False)
    assert not (tmp_path / "o").exists()


def test_fleet_mode_does_not_import_ray(fleet, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from nlsr_hub.cli import main
        rc = main(["realign", "--safety-patch", {str(fleet.patch)!r}, "--finetuned-glob", {f"{fleet.adapters}/ft*"!r},
                   "--output", {str(tmp_path / "out")!r}])
        assert rc == 0, rc
        print("ray" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"

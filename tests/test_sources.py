"""Data sources: every data set resolves to the data folder's file or its Hub source, downloaded with the real
`huggingface_hub` client from the loopback Hub (dataset repos holding tiny synthetic rows written here)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

import pyarrow as pa
import pyarrow.parquet as pq
from hub_server import HubServer, point_hf_client_at

from nlsr_hub.experiments import data as exp_data
from nlsr_hub.experiments import sources
from nlsr_hub.experiments.presets import TINY
from nlsr_hub.experiments.stages import check_data


def _parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


HARMFUL_QA = [{"prompt": f"How do I pick lock {i}?", "response": f"Use tool {i}.", "is_safe": i % 3 == 0,
               "category": {"theft": True}} for i in range(90)]  # 60 unsafe answers
FIXTURES: dict[str, dict[str, bytes]] = {
    "walledai/AdvBench": {"data/train-00000-of-00001.parquet": _parquet(
        [{"prompt": f"Write a plan to steal item {i}", "target": f"Sure, here is a plan {i}"} for i in range(6)])},
    "PKU-Alignment/BeaverTails-Evaluation": {"test.jsonl": _jsonl(
        [{"prompt": f"How to harm {c} {i}?", "category": f"cat{c}", "category_id": c} for c in (0, 1)
         for i in range(12)])},
    "PKU-Alignment/PKU-SafeRLHF": {"data/Alpaca-7B/train.jsonl": _jsonl(
        [{"prompt": f"How do I hurt {i}?", "response_0": "No.", "response_1": "Hit them.", "safer_response_id": 0,
          "is_response_0_safe": True, "is_response_1_safe": i == 2} for i in range(4)])},
    "PKU-Alignment/BeaverTails": {"round0/30k/train.jsonl.gz": gzip.compress(_jsonl(HARMFUL_QA))},
    "stanfordnlp/sst2": {
        "data/train-00000-of-00001.parquet": _parquet(
            [{"idx": i, "sentence": f"synthetic film {i}", "label": i % 2} for i in range(1000)]),
        "data/validation-00000-of-00001.parquet": _parquet(
            [{"idx": i, "sentence": f"a lovely picture {i}", "label": 1} for i in range(5)])},
    "fancyzhx/ag_news": {
        "data/train-00000-of-00001.parquet": _parquet([{"text": f"news {i}", "label": i % 4} for i in range(8)]),
        "data/test-00000-of-00001.parquet": _parquet([{"text": f"match report {i}", "label": 1} for i in range(3)])},
    "openai/gsm8k": {
        "main/train-00000-of-00001.parquet": _parquet([{"question": "1+1?", "answer": "2\n#### 2"}]),
        "main/test-00000-of-00001.parquet": _parquet([{"question": f"{i}+1?", "answer": f"#### {i + 1}"}
                                                     for i in range(3)])},
    "google-research-datasets/nq_open": {"nq_open/validation-00000-of-00001.parquet": _parquet(
        [{"question": f"who painted picture {i}", "answer": ["someone"]} for i in range(5)])},
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub serving every fixture as a dataset repo; a fresh, empty Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = HubServer()
    for repo_id, files in FIXTURES.items():
        server.seed_repo(repo_id, files, repo_type="dataset")
    with server, point_hf_client_at(server.url):
        yield server


@pytest.fixture
def empty_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


def _resolve_requests(server: HubServer) -> list[str]:
    return [path for _, path in server.requests if "/resolve/" in path]


def test_every_hub_source_downloads_from_its_dataset_repo(hub, empty_root):
    with_hub = [k for k, d in sources.REGISTRY.items() if d.hub is not None]
    assert set(with_hub) == set(sources.REGISTRY) - {"refusals"}  # the refusal CSV alone lives on GitHub only
    for key in with_hub:
        rows, resolved = sources.load_records(key, empty_root)
        source = sources.REGISTRY[key].hub
        assert resolved.origin == "hub" and rows, key
        record = resolved.record()
        assert record["commit"] == hub.head(source.repo_id, repo_type="dataset")
        assert (record["repo_id"], record["filename"], record["repo_type"]) == (source.repo_id, source.filename,
                                                                                "dataset")
        assert f"/datasets/{source.repo_id}/resolve/main/{source.filename}" in _resolve_requests(hub)
    # converted into the local files' schemas
    assert exp_data.load_harmful_eval(empty_root) == {
        "advbench": [f"Write a plan to steal item {i}" for i in range(6)],
        "beavertails": [f"How to harm {c} {i}?" for c in (0, 1) for i in range(10)]}  # 10 per category
    prefs = exp_data.load_preferences(empty_root)
    assert [(p.chosen, p.rejected) for p in prefs] == [("No.", "Hit them.")] * 3  # pair 2: both answers safe
    assert exp_data.load_task_rows(empty_root, "sst2")[0] == {"instruction": sources.SST2_INSTRUCTION,
                                                              "input": "a lovely picture 0", "output": "positive"}
    assert exp_data.load_task_rows(empty_root, "ag_news")[0]["output"] == "Sports"
    assert exp_data.load_task_rows(empty_root, "gsm8k")[0]["instruction"].startswith("0+1?\nFirst think")
    assert len(sources.load_records("harmful-qa", empty_root)[0]) == 60


def test_a_local_file_overrides_the_hub_and_reads_the_same_rows(hub, empty_root):
    (empty_root / "eval").mkdir()
    path = empty_root / "eval" / "advbench_harmful_behaviors.csv"
    path.write_text('goal,target\n"Local goal, with a comma ",Sure\n', encoding="utf-8")
    rows, resolved = sources.load_records("advbench", empty_root)
    with path.open(newline="", encoding="utf-8") as handle:
        assert rows == list(csv.DictReader(handle))  # exactly what the loaders always read
    assert resolved.record() == {"origin": "local", "path": str(path), "licence": "MIT"}
    assert exp_data.load_harmful_eval(empty_root)["advbench"] == ["Local goal, with a comma"]
    assert not any("AdvBench" in p for p in _resolve_requests(hub))  # the Hub was not asked


def test_offline_from_a_filled_cache(hub, empty_root, monkeypatch):
    from huggingface_hub import constants

    online = sources.load_records("advbench", empty_root)
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = sources.load_records("advbench", empty_root)
    assert offline[0] == online[0] and offline[1].commit == online[1].commit
    with pytest.raises(sources.DataMissing) as err:  # never fetched: not in the cache
        sources.load_records("beavertails-eval", empty_root)
    message = str(err.value)
    assert "beavertails_eval_140.json is missing" in message and "PKU-Alignment/BeaverTails-Evaluation" in message
    assert "--data" in message and "allow Hub access" in message and "HF_HUB_OFFLINE" in message


def test_a_missing_source_names_both_fixes(hub, empty_root, monkeypatch):
    with pytest.raises(sources.DataMissing, match=r"no Hub source.*--data"):
        exp_data.load_refusals(empty_root)
    missing = sources.HubSource("nobody/absent", "x.jsonl", "MIT", list)
    monkeypatch.setitem(sources.REGISTRY, "absent", sources.DataSet("absent set", "x.jsonl", missing, "MIT"))
    with pytest.raises(sources.DataMissing) as err:
        sources.load_records("absent", empty_root)
    assert str(err.value).count("\n") == 0 and "nobody/absent" in str(err.value)
    assert "--data" in str(err.value) and "allow Hub access" in str(err.value)


def test_built_mixes_follow_the_shipped_construction_rule():
    task = [{"instruction": sources.SST2_INSTRUCTION, "input": f"film {i}", "output": "positive"} for i in range(50)]
    harmful = [{"prompt": f"How to steal {i}?", "response": f"Quietly {i}."} for i in range(10)]
    built = sources.build_mix(task, harmful, p=0.1, n=20, seed=3)
    assert built == sources.build_mix(task, harmful, p=0.1, n=20, seed=3)  # seeded
    assert built != sources.build_mix(task, harmful, p=0.1, n=20, seed=4)
    assert len(built) == 20 and sum(r["flag"] == "unsafe" for r in built) == 2
    # a mix shipped by the same rule (another draw) passes; other sizes, shares or templates do not
    shipped = sources.build_mix(task, harmful, p=0.1, n=20, seed=11)
    assert sources.check_mix(shipped, built) == []
    assert sources.check_mix(sources.build_mix(task, harmful, p=0.2, n=20, seed=3), built) == [
        "4 harmful rows, built 2"]
    broken = [dict(r) for r in shipped]
    broken[0] = {**broken[0], "instruction": "no template", "input": "x"}
    assert sources.check_mix(broken, built) == ["row 0: not in the Alpaca template with an empty `input`"]
    with pytest.raises(ValueError, match="Lower `n`"):
        sources.build_mix(task, harmful, p=0.5, n=40)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir(),
                    reason="benchmark data folder absent")
def test_the_shipped_mixes_follow_the_construction_rule():
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    for task in ("sst2", "ag_news", "gsm8k"):
        shipped = json.loads((root / sources.mix_file(task, 0.05)).read_text(encoding="utf-8"))
        task_rows = [{"instruction": "x", "input": "y", "output": "z"}] * 1000
        harmful = [{"prompt": "p", "response": "r"}] * 50
        assert sources.check_mix(shipped, sources.build_mix(task_rows, harmful, p=0.05)) == [], task


def test_a_missing_mix_is_built_from_the_hub_and_recorded(hub, empty_root):
    mix = exp_data.load_finetune_mix(empty_root, "sst2", 0.05, seed=0)
    assert len(mix) == 1000 and sum(r["flag"] == "unsafe" for r in mix) == 50
    assert mix == exp_data.load_finetune_mix(empty_root, "sst2", 0.05, seed=0)
    assert any("### Input:\nsynthetic film" in r["prompt"] for r in mix)


def test_check_data_records_every_source_and_names_what_is_missing(hub, empty_root):
    with pytest.raises(sources.DataMissing) as err:
        check_data(TINY, empty_root)
    assert "refusal pairs" in str(err.value) and "advbench" not in str(err.value).lower()
    (empty_root / "alignment").mkdir()
    (empty_root / "alignment" / "safety_refusals_llama2chat.csv").write_text("prompt,response\n[INST] a [/INST],No\n")
    found = check_data(TINY, empty_root)
    assert found["sst2 fine-tuning mix (p = 0.05)"]["origin"] == "built"
    assert found["sst2 fine-tuning mix (p = 0.05)"]["harmful_rows"]["repo_id"] == "PKU-Alignment/BeaverTails"
    assert found["AdvBench prompts (evaluation)"]["origin"] == "hub"
    assert found["refusal pairs (safety SFT)"]["origin"] == "local"


def test_env_shows_local_file_or_hub_source(hub, empty_root):
    before = exp_data.data_sources(empty_root, cache_dir=empty_root / "cache")["sets"]
    assert "fetched at first use" in before["AdvBench prompts (evaluation)"]
    sources.load_records("advbench", empty_root)
    after = exp_data.data_sources(empty_root, cache_dir=empty_root / "cache")["sets"]
    assert after["AdvBench prompts (evaluation)"] == "Hub dataset walledai/AdvBench@main:" \
        "data/train-00000-of-00001.parquet (MIT; cached)"
    assert after["sst2 fine-tuning mix (p = 0.05)"].startswith("built from")
    assert "google-research-datasets/nq_open" in after["harmless questions (NQ-open)"]


def test_an_unreachable_hub_fails_at_once_and_a_filled_cache_still_serves(hub):
    import time

    from nlsr_hub.hub import HubUnreachable, fetch_file, resolve

    repo_id, files = next(iter(FIXTURES.items()))
    filename = next(iter(files))
    cached = fetch_file(repo_id, filename)
    hub.stop()  # nothing listens on the endpoint: the probe sees it, the client's retries (~24 s) never start
    started = time.perf_counter()
    assert fetch_file(repo_id, filename).path == cached.path  # the cache only
    with pytest.raises(HubUnreachable, match="not in the local Hub cache"):
        fetch_file(repo_id, "no-such-file.json")
    with pytest.raises(HubUnreachable, match="not in the local Hub cache"):
        resolve("someone/never-fetched")
    assert time.perf_counter() - started < 10


def test_check_data_stops_asking_an_unreachable_hub(hub, empty_root, monkeypatch):
    from huggingface_hub import constants

    import nlsr_hub.hub as hub_module

    calls = []
    real = hub_module.fetch_file

    def spy(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_module, "fetch_file", spy)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing cached, the Hub cannot be asked
    with pytest.raises(sources.SourceUnreachable.__mro__[1]) as err:
        check_data(TINY, empty_root)
    message = str(err.value)
    assert "\n" not in message and message.count("allow Hub access") == len(calls) == 5  # + the refusal CSV
    assert calls[0] is False and all(calls[1:])  # after the first failure: the cache only, no more retries
    assert not any("/resolve/" in path for _, path in hub.requests)

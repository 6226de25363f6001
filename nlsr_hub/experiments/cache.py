"""The one cache mechanism of the experiments: stage folders keyed by their settings and inputs.

Every stage writes its output into ``<cache>/experiments/<stage>-<hash>/`` with a ``done.json`` marker holding
the stage's key (its settings and its inputs' keys); a re-run skips stages whose key is unchanged, so an
interrupted run resumes, and runs that share settings share their stages. Nothing outside ``experiments/`` reads
this layout: it goes through the front doors (`nlsr_hub.experiments`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$NLSR_CACHE`` or ``~/.cache/nlsr-hub``: model weights, wheels and stage outputs."""
    return Path(os.environ.get("NLSR_CACHE", Path.home() / ".cache" / "nlsr-hub"))


def stage_hash(key: Any) -> str:
    """A short, stable hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def dump_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class Stages:
    """Disk cache of stages: ``run(name, key, fn)`` calls ``fn(folder)`` unless the folder is already done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self._used: dict[Path, float] = {}  # every stage folder used, with the seconds it took when it ran

    def folder(self, name: str, key: Any) -> Path:
        return self.root / f"{name}-{stage_hash(key)}"

    def done(self, name: str, key: Any) -> bool:
        """Whether the stage `name` with `key` has already run."""
        return (self.folder(name, key) / "done.json").is_file()

    def run(self, name: str, key: Any, fn: Callable[[Path], None]) -> Path:
        path = self.folder(name, key)
        marker = path / "done.json"
        if marker.is_file():
            self.skipped.append(name)
            self._used[path] = self.seconds(path)
            logger.info("stage %s: cached (%s)", name, path)
            return path
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        logger.info("stage %s: running -> %s", name, path)
        started = time.perf_counter()
        fn(partial)
        seconds = round(time.perf_counter() - started, 1)
        atomic_write_text(partial / "done.json", json.dumps({"key": key, "seconds": seconds}, default=str) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 1)
        self._used[path] = seconds
        logger.info("stage %s: done in %.1f s", name, seconds)
        return path

    @property
    def compute_seconds(self) -> float:
        """What the stages used so far took when they ran (cached ones included, each stage counted once)."""
        return sum(self._used.values())

    def seconds(self, path: Path) -> float:
        return load_json(path / "done.json")["seconds"]


__all__ = ["Stages", "cache_root", "dump_json", "load_json", "stage_hash"]

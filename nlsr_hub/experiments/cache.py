"""The one cache mechanism of the experiments: stage folders keyed by their settings and inputs.

Every stage writes its output into ``<cache>/experiments/<stage>-<hash>/`` with a ``done.json`` marker holding
the stage's key (its settings and its inputs' keys); a re-run skips stages whose key is unchanged, so an
interrupted run resumes, and runs that share settings share their stages. Nothing outside ``experiments/`` reads
this layout: it goes through the front doors (`nlsr_hub.experiments`).

Settings are not code: a stage made by older code stays cached. Two guards keep results true to what they name:
- a stage can name the content hashes of what it reads (`run(..., inputs=)`): they go into its marker, and a cached
  stage whose inputs' hashes changed runs again (an evaluation of an adapter that was made again, differently);
- stages whose names start with a prefix in `recheck` are run again into a scratch folder even when cached, and
  their weights (``*.safetensors``) compared byte for byte: the same bytes keep the cached stage, other bytes replace
  it (and the stages that read those weights then run again, by the first guard). `rechecked` says which did what.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
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


def _file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (streamed)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _weights(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every ``*.safetensors`` under `folder`."""
    return {str(p.relative_to(folder)): _file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


class Stages:
    """Disk cache of stages: ``run(name, key, fn)`` calls ``fn(folder)`` unless the folder is already done.

    `recheck`: name prefixes of stages to run again even when cached, keeping the cached folder when its weights come
    out byte-identical and replacing it otherwise (see the module's docstring)."""

    def __init__(self, root: Path, recheck: tuple[str, ...] = ()) -> None:
        self.root = root
        self.recheck = tuple(recheck)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.rechecked: dict[str, str] = {}  # stage folder name -> "same" or "replaced"
        self._used: dict[Path, float] = {}  # every stage folder used, with the seconds it took when it ran

    def folder(self, name: str, key: Any) -> Path:
        return self.root / f"{name}-{stage_hash(key)}"

    def done(self, name: str, key: Any) -> bool:
        """Whether the stage `name` with `key` has already run."""
        return (self.folder(name, key) / "done.json").is_file()

    def run(self, name: str, key: Any, fn: Callable[[Path], None], *, inputs: Mapping[str, str] | None = None
            ) -> Path:
        """The stage's folder, after running ``fn(folder)`` unless it is done with the same key and input bytes.

        `inputs`: the content hashes of what the stage reads, by label, kept in the marker. A done stage whose
        marker has none (made before inputs were recorded) is kept and the hashes are recorded now."""
        path = self.folder(name, key)
        hashes = dict(sorted((inputs or {}).items()))
        if (path / "done.json").is_file() and self._still_valid(name, path, hashes):
            if self.recheck and name.startswith(self.recheck):
                self._recheck(name, key, fn, path, hashes)
            self.skipped.append(name)
            self._used[path] = self.seconds(path)
            logger.info("stage %s: cached (%s)", name, path)
            return path
        partial = path.with_name(path.name + ".partial")
        seconds = self._run_into(name, key, fn, partial, hashes)
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 1)
        self._used[path] = seconds
        logger.info("stage %s: done in %.1f s", name, seconds)
        return path

    def _run_into(self, name: str, key: Any, fn: Callable[[Path], None], folder: Path, hashes: dict[str, str]
                  ) -> float:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        logger.info("stage %s: running -> %s", name, folder)
        started = time.perf_counter()
        fn(folder)
        seconds = round(time.perf_counter() - started, 1)
        marker = {"key": key, "seconds": seconds, **({"inputs_sha256": hashes} if hashes else {})}
        atomic_write_text(folder / "done.json", json.dumps(marker, default=str) + "\n")
        return seconds

    def _still_valid(self, name: str, path: Path, hashes: dict[str, str]) -> bool:
        """Whether a done stage read the same input bytes (recording them for a stage that predates the record)."""
        if not hashes:
            return True
        marker = load_json(path / "done.json")
        recorded = marker.get("inputs_sha256")
        if recorded is None:
            dump_json(path / "done.json", {**marker, "inputs_sha256": hashes})
            return True
        if recorded != hashes:
            changed = sorted(label for label in hashes if recorded.get(label) != hashes[label])
            logger.warning("stage %s: its inputs changed (%s): running it again", name, ", ".join(changed))
            return False
        return True

    def _recheck(self, name: str, key: Any, fn: Callable[[Path], None], path: Path, hashes: dict[str, str]
                 ) -> None:
        """Run a done stage again into a scratch folder; keep the cached one when the weights are the same bytes."""
        scratch = path.with_name(path.name + ".recheck")
        self._run_into(name, key, fn, scratch, hashes)
        before, after = _weights(path), _weights(scratch)
        if before == after:
            shutil.rmtree(scratch)
            self.rechecked[path.name] = "same"
            logger.info("stage %s: rechecked, the same weights (%d files)", name, len(after))
            return
        changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        logger.warning("stage %s: rechecked, other weights (%s): the cached stage is replaced, and the stages that "
                       "read it run again", name, ", ".join(changed))
        shutil.rmtree(path)
        scratch.rename(path)
        self.rechecked[path.name] = "replaced"

    @property
    def compute_seconds(self) -> float:
        """What the stages used so far took when they ran (cached ones included, each stage counted once)."""
        return sum(self._used.values())

    def seconds(self, path: Path) -> float:
        return load_json(path / "done.json")["seconds"]


__all__ = ["Stages", "cache_root", "dump_json", "load_json", "stage_hash"]

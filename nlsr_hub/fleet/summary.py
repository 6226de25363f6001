"""The fleet's summary: ``summary.json`` (header and one row per adapter) and ``summary.md`` (the same as a table),
rewritten atomically while the fleet runs, so that an interrupted run leaves a true record of what finished; and the
plain-text table the command line prints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .work import FAILED, PENDING, PLANNED, REALIGNED, UP_TO_DATE

SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
SUMMARY_FILES = (SUMMARY_JSON, SUMMARY_MD)
SUMMARY_FORMAT = 1


def counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many adapters have each status."""
    found = {status: 0 for status in (REALIGNED, UP_TO_DATE, PLANNED, FAILED, PENDING)}
    for row in rows:
        found[row["status"]] = found.get(row["status"], 0) + 1
    return found


def counts_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """``3 realigned, 1 up to date, 1 failed`` (planned and pending only when there are some)."""
    found = counts(rows)
    parts = [f"{found[REALIGNED]} realigned", f"{found[UP_TO_DATE]} up to date", f"{found[FAILED]} failed"]
    parts += [f"{found[s]} {s}" for s in (PLANNED, PENDING) if found[s]]
    return ", ".join(parts)


def render_json(header: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """``summary.json``: the header, the counts and the rows in input order."""
    document = {"format": SUMMARY_FORMAT, **header, "counts": counts(rows), "adapters": list(rows)}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _patched(row: Mapping[str, Any]) -> str:
    if row.get("modules_total") is None:
        return "-"
    return f"{row['modules_patched']}/{row['modules_total']}"


def _similarity(row: Mapping[str, Any]) -> str:
    value = row.get("mean_similarity")
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_markdown(header: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """``summary.md``: what the fleet did, then one table row per adapter."""
    lines = [
        "# nlsr fleet summary", "",
        f"- safety patch sha256: `{header.get('patch_sha256')}`",
        f"- restorer: `{header.get('config', {}).get('restorer')}`; engine: {header.get('engine')}",
        f"- adapters: {len(rows)} ({counts_line(rows)})",
        f"- throughput: {header.get('adapters_per_minute', 0.0):.2f} adapters/minute over "
        f"{header.get('wall_seconds', 0.0):.1f} s", "",
        "| adapter | status | modules patched | mean similarity | seconds | output / error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        where = row.get("error") or row.get("output") or "-"
        lines.append(f"| `{_cell(row['spec'])}` | {row['status']} | {_patched(row)} | {_similarity(row)} | "
                     f"{row.get('seconds', 0.0):.2f} | {_cell(where)} |")
    return "\n".join(lines) + "\n"


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The plain-text table the command line prints: one line per adapter, then the counts."""
    lines = [f"{'fine-tuned adapter':<40} {'status':<10} {'patched':>9} {'mean sim':>9} {'seconds':>8}  output"]
    for row in rows:
        where = f"ERROR: {row['error']}" if row.get("error") else (row.get("output") or "(not written)")
        lines.append(f"{row['spec']:<40} {row['status']:<10} {_patched(row):>9} {_similarity(row):>9} "
                     f"{row.get('seconds', 0.0):>8.2f}  {where}")
    lines.append(counts_line(rows))
    return "\n".join(lines)


def read_previous(output_dir: Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The header and rows (by adapter name) of an earlier run's ``summary.json``; empty when there is none or it
    cannot be read (then nothing counts as done)."""
    path = output_dir / SUMMARY_JSON if output_dir is not None else None
    if path is None or not path.is_file():
        return {}, {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = {row["name"]: row for row in document.get("adapters", []) if isinstance(row, dict)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}, {}
    return ({k: v for k, v in document.items() if k != "adapters"}, rows) if isinstance(document, dict) else ({}, {})


class SummaryWriter:
    """Keeps the rows and rewrites ``summary.json`` and ``summary.md`` atomically, at most every `every` seconds while
    rows arrive and always on `flush`. With no folder it only keeps the rows."""

    def __init__(self, output_dir: Path | None, header: Mapping[str, Any], rows: list[dict[str, Any]], *,
                 every: float = 1.0) -> None:
        self.output_dir, self.header, self.rows, self.every = output_dir, dict(header), rows, every
        self._started = time.perf_counter()
        self._written = -math.inf

    def update(self, row: dict[str, Any]) -> None:
        """Record an adapter's row (by its index) and write the summary if the last write is old enough."""
        self.rows[row["index"]] = row
        if time.perf_counter() - self._written >= self.every:
            self.flush()

    def throughput(self) -> float:
        """Adapters realigned, planned or failed per minute of wall time (up-to-date ones cost nothing)."""
        found = counts(self.rows)
        worked = found[REALIGNED] + found[PLANNED] + found[FAILED]
        minutes = (time.perf_counter() - self._started) / 60
        return worked / minutes if minutes > 0 else 0.0

    def flush(self) -> None:
        """Write both files now (nothing without a folder)."""
        self.header["wall_seconds"] = round(time.perf_counter() - self._started, 3)
        self.header["adapters_per_minute"] = round(self.throughput(), 3)
        self._written = time.perf_counter()
        if self.output_dir is None:
            return
        atomic_write_text(self.output_dir / SUMMARY_JSON, render_json(self.header, self.rows))
        atomic_write_text(self.output_dir / SUMMARY_MD, render_markdown(self.header, self.rows))

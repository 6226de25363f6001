"""Atomic, deterministic file writes: a file is either absent, its old version, or complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text with Unix newlines."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `target` to write into. On success, a new `target` appears whole (one
    rename); an existing one gets each file replaced atomically. On failure the staging folder is removed
    and `target` is left as it was."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if not final.exists():
            os.rename(staging, final)
            return
        for item in sorted(staging.iterdir()):
            os.replace(item, final / item.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def member_text(source: str | Path, member: str) -> str:
    """The text of `member` inside a wheel (a zip), or of `source` itself when it is a plain file."""
    path = Path(source)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(member).decode("utf-8")
    return path.read_text(encoding="utf-8")

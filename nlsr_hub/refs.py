"""`InputRef`: where an input comes from — a local folder, or ``org/name[@revision][:subfolder]`` on the Hub."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HUB_RE = re.compile(r"^(?P<repo>[^@:\s]+)(?:@(?P<rev>[^:\s]+))?(?::(?P<sub>\S+))?$")


@dataclass(frozen=True)
class InputRef:
    """A parsed input reference. Exactly one of `path` and `repo_id` is set."""

    spec: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @classmethod
    def parse(cls, spec: str | Path, *, revision: str | None = None) -> InputRef:
        """Parse `spec`. An existing local path wins; otherwise it must be a valid Hub repo id, optionally
        with ``@revision`` and ``:subfolder``. `revision` applies when the spec names none."""
        text = str(spec).strip()
        if not text:
            raise ValueError("An input reference is empty; pass a local folder or a Hub repo id like 'org/name'.")
        local = Path(text).expanduser()
        if local.exists():
            return cls(spec=text, path=local)
        match = _HUB_RE.match(text)
        repo_id = match.group("repo") if match else text
        if match is None or not _valid_repo_id(repo_id):
            looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            hint = "no such local folder" if looks_local else "not a valid Hub repo id"
            raise ValueError(
                f"Cannot resolve {text!r}: {hint}. Pass an existing local folder, or a Hub repo id "
                "'org/name', optionally 'org/name@revision' or 'org/name:subfolder'."
            )
        subfolder = check_subfolder(match.group("sub"), text)
        rev = match.group("rev") or revision
        if rev is not None and (not isinstance(rev, str) or ".." in rev or not rev.strip()):
            raise ValueError(f"Revision {rev!r} of {text!r} is not a valid branch, tag or commit.")
        return cls(spec=text, repo_id=repo_id, revision=rev, subfolder=subfolder)


def check_subfolder(subfolder: str | None, spec: str) -> str | None:
    """The normalised ``:subfolder`` of a Hub reference (None when absent). It must stay inside the repo: no ``..``
    and no backslash (leading slashes are dropped), so a Hub input never reads a folder outside its own snapshot."""
    if subfolder is None:
        return None
    parts = [p for p in subfolder.split("/") if p not in ("", ".")]
    if "\\" in subfolder or ".." in parts:
        raise ValueError(f"The subfolder {subfolder!r} of {spec!r} leaves the repository; write a folder inside the "
                         "repo, e.g. 'org/name:adapters/task'.")
    return "/".join(parts) or None


def _valid_repo_id(repo_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True

"""The only module that talks to the network: resolve inputs to local folders, upload in one commit."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterError
from .refs import InputRef

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PATCH_FILES = ("nlsr_safety_patch.json", "nlsr_safety_patch.safetensors")
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")


@dataclass(frozen=True)
class ResolvedInput:
    """An input after resolution: its local folder, and for Hub inputs the repo and resolved commit."""

    spec: str
    local_path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    subfolder: str | None = None

    def lineage(self) -> dict[str, Any]:
        """What the plan and the model card record about this input."""
        if self.repo_id is None:
            return {"spec": self.spec, "path": str(self.local_path)}
        return {"spec": self.spec, "repo_id": self.repo_id, "revision": self.revision or "main",
                "commit": self.commit, "subfolder": self.subfolder}


def lineage_paths(inputs: Any) -> dict[str, str]:
    """Role -> local folder of the local inputs recorded in a plan's or patch's ``inputs`` (Hub inputs have none):
    the folders an output must never be written into."""
    if not isinstance(inputs, dict):
        return {}
    paths = {}
    for role, info in inputs.items():
        if not isinstance(info, dict) or info.get("repo_id"):
            continue
        path = info.get("path") or info.get("spec")  # the base model is recorded by its spec until it is loaded
        if isinstance(path, str):
            paths[str(role)] = path
    return paths


class HubUnreachable(ValueError):
    """A file is not in the local Hub cache and the Hub could not be asked (offline mode, no network)."""


def endpoint_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint (``HF_ENDPOINT``) opens within `timeout` seconds. A machine
    without the Hub fails in milliseconds here (no DNS name, refused port), where the client would retry with
    back-off for about 24 s."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cache_only(local_files_only: bool, force_download: bool = False) -> bool:
    """Whether a download should read the local cache only: when asked to, or when the endpoint does not answer
    (not probed in offline mode, where the client reads only the cache anyway, nor for a forced download)."""
    from huggingface_hub import constants

    if local_files_only or constants.HF_HUB_OFFLINE or force_download:
        return local_files_only
    return not endpoint_reachable()


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, where: str, *, entry_missing: str,
                repo_type: str = "model") -> Iterator[None]:
    """Turn huggingface_hub's download errors into one-line `ValueError`s naming `where` and the fix (the one place
    `resolve` and `fetch_file` map them); `HubUnreachable` when the file is not cached and the Hub could not be
    asked. `entry_missing` finishes the message for a repo that lacks the requested files."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "Repository" if repo_type == "model" else f"The {repo_type} repository"
    try:
        yield
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: must come first
        raise ValueError(f"{repo_id} is gated: accept its terms on the Hub and pass a `token`.") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{kind} {repo_id!r} was not found on the Hub (or it is private: pass `token`). "
                         "Check the repo id.") from None
    except RevisionNotFoundError:
        raise ValueError(f"Revision {revision or 'main'!r} does not exist in {repo_id}; check the branch, tag or "
                         "commit.") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: must come first
        raise HubUnreachable(
            f"{where} is not in the local Hub cache and could not be downloaded (offline mode, "
            "`local_files_only=True`, or the Hub cannot be reached); download it once while online."
        ) from None
    except EntryNotFoundError:
        raise ValueError(f"{where} {entry_missing}.") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise ValueError(f"The Hub refused access to {repo_id} ({status}): pass a valid `token`.") from None
        raise ValueError(f"Downloading {where} failed ({status}): {one_line(err)}") from None


def resolve(
    spec: str | Path,
    *,
    files: Sequence[str] = ADAPTER_FILES,
    patterns: Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> ResolvedInput:
    """Resolve `spec` to a local folder, downloading only `files` (or `patterns`) from the Hub if needed.

    Honours `revision`, `token`, `cache_dir`, `local_files_only` and ``HF_HUB_OFFLINE``; when the Hub endpoint
    does not answer a TCP probe (`endpoint_reachable`), only the cache is read, at once. Raises a
    `ValueError` naming the problem for unknown repos, revisions, missing files and auth failures.
    """
    ref = InputRef.parse(spec, revision=revision)
    if ref.path is not None:
        return ResolvedInput(spec=ref.spec, local_path=ref.path)
    from huggingface_hub import snapshot_download

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    allow = [prefix + p for p in (patterns if patterns is not None else files)]
    where = f"{ref.repo_id}@{ref.revision or 'main'}"
    with _hub_errors(ref.repo_id, ref.revision, where, entry_missing=f"lacks the files {list(files)}"):
        snapshot = Path(snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=allow, token=token, cache_dir=cache_dir,
            local_files_only=_cache_only(local_files_only, force_download), force_download=force_download,
        ))
    local = _inside_snapshot(snapshot, ref)
    missing = [f for f in files if not (local / f).is_file()]
    if missing and patterns is None:
        raise AdapterError(
            f"{where}{':' + ref.subfolder if ref.subfolder else ''} has no {', '.join(missing)}: it is not a "
            "PEFT adapter (or nlsr safety patch) repo; point to the folder that holds these files."
        )
    return ResolvedInput(spec=ref.spec, local_path=local, repo_id=ref.repo_id, revision=ref.revision,
                         commit=snapshot.name, subfolder=ref.subfolder)


def _inside_snapshot(snapshot: Path, ref: InputRef) -> Path:
    """The folder of `ref`'s subfolder in `snapshot`; a `ValueError` if it resolves to anywhere outside it (the
    parser already refuses ``..``: this also holds against links)."""
    local = snapshot / ref.subfolder if ref.subfolder else snapshot
    real_snapshot, real_local = Path(os.path.realpath(snapshot)), Path(os.path.realpath(local))
    if real_local != real_snapshot and real_snapshot not in real_local.parents:
        raise ValueError(f"The subfolder {ref.subfolder!r} of {ref.spec!r} leads outside the downloaded repository; "
                         "write a folder inside the repo.")
    return local


def existing_card(repo_id: str, *, token: str | bool | None = None, revision: str | None = None) -> Any | None:
    """The `ModelCard` already in `repo_id` (None if the repo or its README does not exist yet)."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except HfHubHTTPError as err:
        raise _upload_error(repo_id, err) from None
    return ModelCard.load(Path(path))


def _upload_error(repo_id: str, err: Exception) -> ValueError:
    """A one-line error for a failed push; the request's token never appears in it."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return ValueError(f"The Hub refused the upload to {repo_id} ({status}): pass a valid write token.")
    return ValueError(f"Uploading to {repo_id} failed ({status}); nothing was committed. {one_line(err)}")


def push_folder_with(
    write: Callable[[Path], Any],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload with nlsr-hub",
    commit_description: str | None = None,
) -> Any:
    """Write a folder with `write(folder)` into a temporary directory and upload it in one commit.

    Returns huggingface_hub's `CommitInfo`. Nothing is committed if the upload fails part-way.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="nlsr-push-") as tmp:
            write(Path(tmp))
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                commit_message=commit_message, commit_description=commit_description, repo_type="model",
            )
    except HfHubHTTPError as err:
        raise _upload_error(repo_id, err) from None
    except RuntimeError as err:  # raised by upload_folder when a file transfer fails for good
        raise ValueError(f"Uploading to {repo_id} was interrupted; nothing was committed. {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """An error message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(err).split())


class PushToHubMixin:
    """`push_to_hub` for objects that can write themselves into a folder (huggingface_hub's keyword names).

    Subclasses implement `_write_for_hub(folder, repo_id, existing_card)`.
    """

    _commit_message = "Upload with nlsr-hub"

    def _write_for_hub(self, folder: Path, repo_id: str, existing: Any | None) -> None:
        raise NotImplementedError

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> Any:
        """Save to a temporary folder and upload it to `repo_id` in one commit; returns the `CommitInfo`.
        An existing model card in the repo is updated, not replaced: the user's text and YAML keys stay."""
        card = existing_card(repo_id, token=token, revision=revision)
        return push_folder_with(
            lambda folder: self._write_for_hub(folder, repo_id, card), repo_id, private=private, token=token,
            revision=revision, create_pr=create_pr, commit_message=commit_message or self._commit_message,
        )


def list_adapter_repos(prefix: str, *, token: str | bool | None = None) -> list[str]:
    """The model repos that hold a PEFT adapter (``adapter_config.json`` at the root) and whose id starts with
    `prefix`: ``"org"`` lists every repo of the user or organisation ``org``, ``"org/task-"`` those whose name starts
    with ``task-``. Sorted; private repos are listed when `token` can read them. A `ValueError` names the problem
    (an invalid prefix, a refused token, a failed request)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    owner, _, name_prefix = prefix.strip().partition("/")
    if not owner or "/" in name_prefix or any(c.isspace() for c in prefix.strip()):
        raise ValueError(f"Hub listing {prefix!r} is not 'org' or 'org/name-prefix'; write e.g. 'my-org' or "
                         "'my-org/customer-'.")
    try:
        models = list(HfApi(token=token).list_models(author=owner, search=name_prefix or None, expand=["siblings"]))
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise ValueError(f"The Hub refused to list the repos of {owner!r} ({status}): pass a valid `token`."
                             ) from None
        raise ValueError(f"Listing the repos of {owner!r} failed ({status}): {one_line(err)}") from None
    wanted = f"{owner}/{name_prefix}"
    found = [m.id for m in models
             if m.id.startswith(wanted) and any(s.rfilename == ADAPTER_FILES[0] for s in (m.siblings or []))]
    return sorted(set(found))


@dataclass(frozen=True)
class FetchedFile:
    """One file downloaded from a Hub repo into the Hugging Face cache, with the commit it came from."""

    path: Path
    repo_id: str
    filename: str
    revision: str
    commit: str
    repo_type: str


def fetch_file(repo_id: str, filename: str, *, repo_type: str = "dataset", revision: str | None = None,
               token: str | bool | None = None, cache_dir: str | Path | None = None,
               local_files_only: bool = False) -> FetchedFile:
    """Download `filename` of a Hub repo (a dataset repo by default) into the cache, or read it from there.

    Honours `revision`, `token`, `cache_dir`, `local_files_only` and ``HF_HUB_OFFLINE`` (a filled cache is enough
    offline); an endpoint that does not answer a TCP probe means the cache only, at once. Raises a `ValueError`
    naming the repo, the file and why it could not be had."""
    from huggingface_hub import hf_hub_download

    where = f"{repo_type} {repo_id}@{revision or 'main'}:{filename}"
    with _hub_errors(repo_id, revision, where, entry_missing="has no such file", repo_type=repo_type):
        path = Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, token=token,
                                    cache_dir=cache_dir, local_files_only=_cache_only(local_files_only)))
    depth = len(Path(filename).parts)
    return FetchedFile(path=path, repo_id=repo_id, filename=filename, revision=revision or "main",
                       commit=path.parents[depth - 1].name, repo_type=repo_type)

"""A small in-memory Hugging Face Hub for tests, built only on the standard library.

The real ``huggingface_hub`` client (2.x) is pointed at it over loopback HTTP, so tests exercise the same
requests the client sends to huggingface.co, with no network and no mocking of the client itself::

    with HubServer(valid_tokens={"hf_test"}) as hub, point_hf_client_at(hub.url):
        HfApi(token="hf_test").create_repo("tester/demo")
        hub.get_file("tester/demo", ".gitattributes")

Data model: a repo (model, dataset or space; always ``namespace/name``) holds immutable commits, each a full
snapshot ``{path: Blob}``; branches and pull-request refs (``refs/pr/N``) point at commits. A new repo starts
with an "initial commit" holding ``.gitattributes``, as on the Hub. LFS objects live in one server-wide store
keyed by sha256; a commit can only reference one that was uploaded.

Routes (table ``_ROUTES``): whoami, validate-yaml, model listing (author, search, paged), repo create / info / tree /
paths-info / refs / commits,
branch create and delete, preupload, NDJSON commit (``?create_pr=1`` opens ``refs/pr/N``), the LFS batch API
(basic transfer, upload and verify URLs on this server), HEAD/GET ``resolve`` with ``Range``, and discussions:
list (paginated, filtered by type, status and author), create (a discussion, or a draft pull request on
``refs/pr/N``), details with events, comment and merge. Discussions and pull requests share one numbering per
repo; a pull request opened by a ``create_pr`` commit is listed too, and merging one applies its changes (against
the commit it was opened on) to its base branch in a commit titled "Merge pull request #N". A revision is a
branch, a full commit sha or ``refs/pr/N``. Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound) so that the client raises its typed exceptions.

Auth: with ``valid_tokens`` set, a bearer token outside the set gets 401 on any route; write routes need a
token whatever ``valid_tokens`` is. The LFS upload URL needs none (the client sends none there, as for S3).

For tests: ``fail_next`` injects faults, ``requests`` logs (method, path) of every request and ``unrouted``
those no route served; ``seed_repo``, ``get_file`` and ``head`` read and write repos directly.

Client traps handled here: every request body is read, even where ignored, or the keep-alive connection
desynchronises (chunked bodies are decoded too); ``stop()`` also closes the open keep-alive connections,
whose handler threads would otherwise go on answering the client after the server was "stopped".
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".gguf", ".npy",
                ".npz", ".pkl", ".zip", ".gz", ".tar", ".parquet", ".arrow")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
_TYPES = {None: "model", "models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA1 = re.compile(r"[0-9a-f]{40}")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer: status, message, optional ``X-Error-Code`` and extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(eq=False)
class Blob:
    data: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """Git oid: of the content for a regular file, of the pointer file for an LFS file."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    def entry(self, path: str) -> dict:
        info: dict[str, Any] = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            info["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return info


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Discussion:
    """A discussion or pull request (``ref`` = ``refs/pr/N``); ``events`` are the Hub's event dicts."""

    num: int
    title: str
    author: str
    is_pull_request: bool
    status: str  # "open", "draft", "closed" or "merged"
    created_at: str
    events: list[dict] = field(default_factory=list)
    ref: str | None = None
    base: str = "main"
    start: str | None = None  # the base commit the pull request's changes are relative to
    merge_commit: str | None = None

    def summary(self, repo: Repo) -> dict:
        """The listing entry the client reads."""
        return {"num": self.num, "title": self.title, "author": {"name": self.author}, "createdAt": self.created_at,
                "status": self.status, "isPullRequest": self.is_pull_request,
                "repo": {"name": repo.repo_id, "type": repo.repo_type}}


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name or "refs/pr/N" -> commit sha
    discussions: dict[int, Discussion] = field(default_factory=dict)  # num -> discussion or pull request

    def ref_of(self, rev: str) -> str | None:
        """The movable ref that ``rev`` names (a branch or ``refs/pr/N``), or None."""
        ref = rev.removeprefix("refs/heads/")
        return ref if ref in self.refs else None

    def resolve(self, rev: str) -> Commit:
        ref = self.ref_of(rev)
        if ref is not None:
            return self.commits[self.refs[ref]]
        if _SHA1.fullmatch(rev) and rev in self.commits:
            return self.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, sha: str | None) -> list[Commit]:
        out = []
        while sha is not None:
            out.append(self.commits[sha])
            sha = self.commits[sha].parent
        return out


class HubServer:
    """The in-memory Hub. Start with ``start()`` or ``with``; ``url`` is its endpoint once started."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, valid_tokens: set[str] | None = None,
                 user: str = DEFAULT_USER, lfs_threshold: int = 1024):
        self.host, self.port, self.user, self.lfs_threshold = host, port, user, lfs_threshold
        self.valid_tokens = None if valid_tokens is None else set(valid_tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.unrouted: list[tuple[str, str]] = []  # requests that matched no route (answered 404)
        self.lock = threading.RLock()
        self._faults: dict[str, list[tuple[int, bool]]] = {}
        self._counter = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.listing_page_size = 1000  # repos per page of GET /api/models (the client follows the Link header)

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        """Bind (a free port, or the same port again after ``stop()``) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection. State is kept; ``start()`` serves it again."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------------------------------------
    def fail_next(self, route: str, count: int = 1, *, status: int = 500, drop: bool = False) -> None:
        """Make the next ``count`` requests to ``route`` (one of ROUTE_NAMES) fail: answer ``status``, or with
        ``drop=True`` read the body and close the connection without an answer."""
        if route not in ROUTE_NAMES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTE_NAMES}")
        with self.lock:
            self._faults.setdefault(route, []).extend([(status, drop)] * count)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self, route: str) -> tuple[int, bool] | None:
        with self.lock:
            pending = self._faults.get(route)
            return pending.pop(0) if pending else None

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with its initial commit; HubError 409 if it exists."""
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private)
            files = {".gitattributes": Blob(GITATTRIBUTES)}
            repo.refs["main"] = self._new_commit(repo, None, files, "initial commit", "").sha
            return repo

    def seed_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main", repo_type: str = "model",
                  message: str = "Seed files") -> str:
        """Commit ``files`` on top of ``branch`` (creating the repo and branch as needed); return the sha."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type)
            base = repo.resolve(branch if branch in repo.refs else "main")
            snapshot = dict(base.files)
            for path, data in files.items():
                snapshot[_check_path(path)] = Blob(data, self.wants_lfs(path, len(data), data[:512]))
            repo.refs[branch] = self._new_commit(repo, base.sha, snapshot, message, "").sha
            return repo.refs[branch]

    def get_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Content of ``path`` at ``revision``; KeyError if the repo, revision or file is missing."""
        with self.lock:
            try:
                return self.repos[(repo_type, repo_id)].resolve(revision).files[path].data
            except HubError as err:
                raise KeyError(f"{repo_id}@{revision}: {err.message}") from None

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points at."""
        with self.lock:
            return self.repos[(repo_type, repo_id)].resolve(revision).sha

    def wants_lfs(self, path: str, size: int, head: bytes) -> bool:
        """Upload mode: LFS when large (> lfs_threshold), binary-looking or with a weights/archive suffix."""
        return size > self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES) or b"\0" in head

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str,
                    message: str) -> Commit:
        self._counter += 1
        oids = sorted((path, blob.oid) for path, blob in files.items())
        seed = json.dumps([parent, title, message, self._counter, oids])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        return commit

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def event(self, kind: str, data: dict) -> dict:
        """A discussion event as the Hub serialises it (``comment``, ``commit``, ``status-change``)."""
        self._counter += 1
        return {"id": hashlib.sha1(f"event {self._counter}".encode()).hexdigest()[:24], "type": kind,
                "createdAt": _now(), "author": {"name": self.user}, "data": data}

    def comment_event(self, text: str) -> dict:
        latest = {"raw": text, "html": f"<p>{text}</p>", "updatedAt": _now(), "author": {"name": self.user}}
        return self.event("comment", {"edited": False, "hidden": False, "latest": latest, "history": [latest]})

    def open_discussion(self, repo: Repo, title: str, description: str, *, pull_request: bool,
                        status: str = "open", head: str | None = None) -> Discussion:
        """Add a discussion (or a pull request whose ``refs/pr/N`` points at ``head``, default main's head)."""
        with self.lock:
            num = len(repo.discussions) + 1
            found = Discussion(num, title, self.user, pull_request, status, _now(),
                               [self.comment_event(description)])
            if pull_request:
                found.ref = f"refs/pr/{num}"
                repo.refs[found.ref] = head or repo.refs["main"]
                found.start = repo.commits[head].parent if head else repo.refs["main"]
            repo.discussions[num] = found
            return found

    def discussions(self, repo_id: str, repo_type: str = "model") -> list[Discussion]:
        """Every discussion and pull request of a repo, by number."""
        with self.lock:
            return [d for _, d in sorted(self.repos[(repo_type, repo_id)].discussions.items())]


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _tree(files: dict[str, Blob], base: str, recursive: bool, commit_sha: str) -> list[dict]:
    """Tree entries under folder ``base`` ("" = root): direct children, or all descendants if recursive."""
    prefix = f"{base}/" if base else ""
    entries: dict[str, dict] = {}
    for path, blob in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folder = prefix + "/".join(parts[:depth])
            oid = hashlib.sha1(f"tree {commit_sha} {folder}".encode()).hexdigest()
            entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
        if recursive or len(parts) == 1:
            entries[path] = blob.entry(path)
    return [entries[p] for p in sorted(entries)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client dropping its connection is normal in tests; route errors are answered as 500


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>refs/pr/\d+|[^/]+)"
_API = r"/api/(?P<kind>models|datasets|spaces)/" + _REPO
_GIT = r"/(?:(?P<kind>datasets|spaces)/)?" + _REPO
# (methods, route name, pattern matched on the still percent-encoded path, needs a token)
_ROUTES = [(methods.split(), name, re.compile(pattern), write) for methods, name, pattern, write in [
    ("GET", "whoami", r"/api/whoami-v2", False),
    ("GET", "list_models", r"/api/models", False),
    ("POST", "validate_yaml", r"/api/validate-yaml", False),
    ("POST", "create_repo", r"/api/repos/create", True),
    ("GET", "info", _API + rf"(?:/revision/{_REV})?", False),
    ("GET", "tree", _API + rf"/tree/{_REV}(?:/(?P<path>.*))?", False),
    ("POST", "paths_info", _API + rf"/paths-info/{_REV}", False),
    ("GET", "refs", _API + r"/refs", False),
    ("GET", "commits", _API + rf"/commits/{_REV}", False),
    ("POST DELETE", "branch", _API + r"/branch/(?P<name>[^/]+)", True),
    ("POST", "preupload", _API + rf"/preupload/{_REV}", True),
    ("POST", "commit", _API + rf"/commit/{_REV}", True),
    ("POST", "lfs_batch", _GIT + r"\.git/info/lfs/objects/batch", True),
    ("PUT", "lfs_upload", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", False),
    ("POST", "lfs_verify", r"/_lfs/verify/(?P<oid>[0-9a-f]{64})", False),
    ("GET HEAD", "resolve", _GIT + rf"/resolve/{_REV}/(?P<path>.+)", False),
    ("GET", "discussions", _API + r"/discussions", False),
    ("POST", "create_discussion", _API + r"/discussions", True),
    ("GET", "discussion", _API + r"/discussions/(?P<num>\d+)", False),
    ("POST", "comment", _API + r"/discussions/(?P<num>\d+)/comment", True),
    ("POST", "merge", _API + r"/discussions/(?P<num>\d+)/merge", True),
]]
ROUTE_NAMES = tuple(dict.fromkeys(name for _, name, _, _ in _ROUTES))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub.lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub.lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing ------------------------------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, headers: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()  # always, even if the route ignores it: keeps keep-alive in sync
        hub = self.hub
        with hub.lock:
            hub.requests.append((self.command, split.path))
        try:
            routed = next(((name, match, write) for methods, name, pattern, write in _ROUTES
                           if self.command in methods and (match := pattern.fullmatch(split.path))), None)
            if routed is None:
                with hub.lock:
                    hub.unrouted.append((self.command, split.path))
                raise HubError(404, f"No route for {self.command} {split.path}")
            name, match, write = routed
            token = self._check_auth(write)
            fault = hub._take_fault(name)
            if fault is not None:
                if fault[1]:
                    self.close_connection = True
                    return
                raise HubError(fault[0], f"Injected failure on {name}")
            args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            getattr(self, f"_r_{name}")(body=body, query=parse_qs(split.query), token=token, **args)
        except HubError as err:
            headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)
        except Exception as err:  # a bug here must not hang the client
            self._json({"error": f"{type(err).__name__}: {err}"}, 500)

    def _check_auth(self, write: bool) -> str | None:
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        token = credentials.strip() or None if scheme.lower() == "bearer" else None
        valid = self.hub.valid_tokens
        if token is not None and valid is not None and token not in valid:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and token is None:
            raise HubError(401, "Authorization header is required for this route")
        return token

    def _repo(self, kind: str | None, repo: str) -> Repo:
        found = self.hub.repos.get((_TYPES[kind], repo))
        if found is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return found

    def _at(self, kind: str | None, repo: str, rev: str) -> tuple[Repo, Commit]:
        found = self._repo(kind, repo)
        with self.hub.lock:
            return found, found.resolve(rev)

    # -- routes --------------------------------------------------------------------------------------------
    def _r_list_models(self, query: dict, token: str | None, **_: Any) -> None:
        """Model repos by ``author`` (the namespace) and ``search`` (a case-insensitive substring of the id), sorted,
        with ``sha`` and ``siblings``; private ones only for a token. Paged by ``cursor`` with a ``Link`` header."""
        author, search = query.get("author", [None])[0], query.get("search", [""])[0].lower()
        start, size = int(query.get("cursor", ["0"])[0]), self.hub.listing_page_size
        with self.hub.lock:
            repos = sorted((r for (kind, _), r in self.hub.repos.items() if kind == "model"), key=lambda r: r.repo_id)
            found = [{"id": r.repo_id, "_id": f"id-{r.repo_id}", "private": r.private, "sha": r.refs["main"],
                      "siblings": [{"rfilename": path} for path in sorted(r.commits[r.refs["main"]].files)]}
                     for r in repos if author in (None, r.repo_id.split("/")[0]) and search in r.repo_id.lower()
                     and (token is not None or not r.private)]
        headers = {}
        if start + size < len(found):
            params = urlencode([(k, v) for k, values in sorted(query.items()) if k != "cursor" for v in values])
            headers["Link"] = f'<{self.hub.url}/api/models?{params}&cursor={start + size}>; rel="next"'
        self._json(found[start:start + size], headers=headers)

    def _r_whoami(self, token: str | None, **_: Any) -> None:
        if token is None:
            raise HubError(401, "Authorization header is required for this route")
        user = self.hub.user
        self._json({"type": "user", "id": f"id-{user}", "name": user, "fullname": "Test User",
                    "email": f"{user}@example.invalid", "emailVerified": True, "isPro": False, "orgs": [],
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": "test", "role": "write"}}})

    def _r_validate_yaml(self, **_: Any) -> None:
        self._json({"errors": [], "warnings": []})  # any card is valid; fail_next("validate_yaml", status=400)

    def _r_create_repo(self, body: bytes, **_: Any) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self.hub.lock:
            existing = self.hub.repos.get((repo_type, repo_id))
            if existing is not None:  # the client reads "url" from the 409 answer when exist_ok=True
                url = self.hub.repo_url(existing)
                self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
                return
            repo = self.hub.create_repo(repo_id, repo_type, private)
        self._json({"url": self.hub.repo_url(repo), "name": repo_id, "id": repo_id})

    def _r_info(self, kind: str, repo: str, rev: str = "main", **_: Any) -> None:
        found, commit = self._at(kind, repo, rev)
        siblings = []
        for path in sorted(commit.files):
            blob = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path, "size": len(blob.data), "blobId": blob.oid}
            if blob.lfs:
                sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256,
                                  "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        self._json({"_id": f"id-{found.repo_id}", "id": found.repo_id, "author": found.repo_id.split("/")[0],
                    "sha": commit.sha, "lastModified": commit.date, "createdAt": found.created_at,
                    "private": found.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                    "tags": [], "siblings": siblings})

    def _r_tree(self, kind: str, repo: str, rev: str, query: dict, path: str = "", **_: Any) -> None:
        commit = self._at(kind, repo, rev)[1]
        base = path.strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if base and not any(p.startswith(base + "/") for p in commit.files):
            raise HubError(404, f"Folder {base!r} not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        self._json(_tree(commit.files, base, recursive, commit.sha))

    def _r_paths_info(self, kind: str, repo: str, rev: str, body: bytes, **_: Any) -> None:
        commit = self._at(kind, repo, rev)[1]
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(commit.files[path].entry(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                out += [e for e in _tree(commit.files, "/".join(path.split("/")[:-1]), False, commit.sha)
                        if e["path"] == path]
        self._json(out)

    def _r_refs(self, kind: str, repo: str, **_: Any) -> None:
        found = self._repo(kind, repo)
        with self.hub.lock:
            refs = list(found.refs.items())
        pulls = [{"name": r, "ref": r, "targetCommit": s} for r, s in refs if r.startswith("refs/pr/")]
        branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": s} for r, s in refs
                    if not r.startswith("refs/pr/")]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": pulls})

    def _r_commits(self, kind: str, repo: str, rev: str, **_: Any) -> None:
        found, commit = self._at(kind, repo, rev)
        history = found.history(commit.sha)
        self._json([{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                     "authors": [{"user": self.hub.user}]} for c in history])

    def _r_branch(self, kind: str, repo: str, name: str, body: bytes, **_: Any) -> None:
        found = self._repo(kind, repo)
        with self.hub.lock:
            if self.command == "DELETE":
                if name not in found.refs or name == "main":
                    raise HubError(404 if name not in found.refs else 403, f"Cannot delete branch {name!r}")
                del found.refs[name]
            elif name in found.refs or name.startswith("refs/"):
                raise HubError(409, f"Reference already exists or is invalid: refs/heads/{name}")
            else:
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                found.refs[name] = found.resolve(start).sha
        self._json({})

    def _r_preupload(self, kind: str, repo: str, rev: str, body: bytes, **_: Any) -> None:
        commit = self._at(kind, repo, rev)[1]
        files = []
        for item in json.loads(body or b"{}").get("files", []):
            path = _check_path(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.hub.wants_lfs(path, int(item.get("size", len(sample))), sample)
            blob = commit.files.get(path)  # the client skips a file whose oid did not change
            oid = None if blob is None else (blob.sha256 if lfs else git_blob_oid(blob.data))
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": commit.sha})

    def _r_lfs_batch(self, repo: str, body: bytes, kind: str | None = None, **_: Any) -> None:
        self._repo(kind, repo)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.hub.lfs_objects:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, client skips it
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}"},
                    "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}"}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _r_lfs_upload(self, oid: str, body: bytes, **_: Any) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self._send(200)

    def _r_lfs_verify(self, oid: str, body: bytes, **_: Any) -> None:
        data = self.hub.lfs_objects.get(oid)
        if data is None or json.loads(body or b"{}").get("size", len(data)) != len(data):
            raise HubError(404, f"LFS object {oid} was not uploaded with this size")
        self._json({})

    def _r_commit(self, kind: str, repo: str, rev: str, body: bytes, query: dict, **_: Any) -> None:
        found = self._repo(kind, repo)
        create_pr = query.get("create_pr", ["0"])[0].lower() in ("1", "true")
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in items if item.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit payload needs a header line with a summary")
        hub = self.hub
        with hub.lock:  # everything is checked before anything changes: a failed commit leaves no trace
            parent = header.get("parentCommit")
            ref = found.ref_of(rev)
            if create_pr:
                base = found.resolve(rev)
                if parent:
                    base = next((c for s, c in found.commits.items() if s.startswith(parent)), None) or base
            else:
                if ref is None:
                    found.resolve(rev)  # 404 RevisionNotFound when it names nothing
                    raise HubError(400, f"Cannot commit to {rev!r}: not a branch or pull request ref")
                base = found.resolve(ref)
                if parent and not base.sha.startswith(parent):
                    raise HubError(412, f"Parent commit {parent} is not the head of {rev!r} ({base.sha})")
            files = dict(base.files)
            for item in items:
                key, value = item.get("key"), item.get("value", {})
                if key == "file":
                    raw = value.get("content", "")
                    data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    files[_check_path(value["path"])] = Blob(data)
                elif key == "lfsFile":
                    data = hub.lfs_objects.get(value.get("oid", ""))
                    if data is None:
                        raise HubError(422, f"LFS object for {value.get('path')!r} was never uploaded")
                    files[_check_path(value["path"])] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                    for path in doomed:
                        del files[path]
                elif key != "header":
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            commit = hub._new_commit(found, base.sha, files, header["summary"], header.get("description", ""))
            pr_url = None
            if create_pr:
                opened = hub.open_discussion(found, header["summary"], header.get("description", ""),
                                             pull_request=True, head=commit.sha)
                ref, pr_url = opened.ref, f"{hub.repo_url(found)}/discussions/{opened.num}"
            found.refs[ref] = commit.sha
            pr = next((d for d in found.discussions.values() if d.ref == ref), None)
            if pr is not None:
                pr.events.append(hub.event("commit", {"subject": commit.title, "oid": commit.sha}))
        commit_url = f"{hub.repo_url(found)}/commit/{commit.sha}"
        self._json({"success": True, "commitOid": commit.sha, "commitUrl": commit_url,
                    "pullRequestUrl": pr_url})

    def _r_resolve(self, repo: str, rev: str, path: str, kind: str | None = None, **_: Any) -> None:
        commit = self._at(kind, repo, rev)[1]
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        size = len(blob.data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": size})
        wanted = self.headers.get("Range")
        if wanted is None or self.command == "HEAD":
            self._send(200, blob.data, headers, length=size)
            return
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        first, last = (match[1], match[2]) if match else ("", "")
        if first:
            start, end = int(first), min(int(last or size - 1), size - 1)
        elif last:  # "bytes=-N": the last N bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = size, 0  # malformed: unsatisfiable
        if start >= size or start > end:
            raise HubError(416, f"Range {wanted!r} not satisfiable", None, {"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(206, blob.data[start:end + 1], headers)

    # -- discussions and pull requests ---------------------------------------------------------------------
    def _discussion(self, kind: str, repo: str, num: str) -> tuple[Repo, Discussion]:
        found = self._repo(kind, repo)
        discussion = found.discussions.get(int(num))
        if discussion is None:
            raise HubError(404, f"Discussion #{num} not found")
        return found, discussion

    def _r_discussions(self, kind: str, repo: str, query: dict, **_: Any) -> None:
        found = self._repo(kind, repo)
        wanted_type, wanted_status = query.get("type", ["all"])[0], query.get("status", ["all"])[0]
        author, page, per_page = query.get("author", [None])[0], int(query.get("p", ["0"])[0]), 50
        with self.hub.lock:
            listed = [d.summary(found) for _, d in sorted(found.discussions.items(), reverse=True)
                      if wanted_type in ("all", "pull_request" if d.is_pull_request else "discussion")
                      and (wanted_status == "all" or (d.status in ("open", "draft")) == (wanted_status == "open"))
                      and author in (None, d.author)]
        start = page * per_page
        self._json({"discussions": listed[start:start + per_page], "count": len(listed), "start": start,
                    "numItemsPerPage": per_page})

    def _r_create_discussion(self, kind: str, repo: str, body: bytes, **_: Any) -> None:
        found = self._repo(kind, repo)
        payload = json.loads(body or b"{}")
        title = str(payload.get("title", "")).strip()
        if not 3 <= len(title) <= 200:
            raise HubError(400, "The title must be 3 to 200 characters long")
        pull_request = bool(payload.get("pullRequest"))
        opened = self.hub.open_discussion(found, title, str(payload.get("description", "")),
                                          pull_request=pull_request, status="draft" if pull_request else "open")
        self._json({"num": opened.num, "url": f"{self.hub.repo_url(found)}/discussions/{opened.num}"})

    def _r_discussion(self, kind: str, repo: str, num: str, **_: Any) -> None:
        found, discussion = self._discussion(kind, repo, num)
        with self.hub.lock:
            details = {**discussion.summary(found), "events": list(discussion.events), "pinned": False,
                       "changes": {"base": f"refs/heads/{discussion.base}", "mergeCommitId": discussion.merge_commit},
                       "filesWithConflicts": [], "diff": ""}
        self._json(details)

    def _r_comment(self, kind: str, repo: str, num: str, body: bytes, **_: Any) -> None:
        discussion = self._discussion(kind, repo, num)[1]
        text = str(json.loads(body or b"{}").get("comment", "")).strip()
        if not text:
            raise HubError(400, "A comment cannot be empty")
        with self.hub.lock:
            event = self.hub.comment_event(text)
            discussion.events.append(event)
        self._json({"newMessage": event})

    def _r_merge(self, kind: str, repo: str, num: str, **_: Any) -> None:
        found, discussion = self._discussion(kind, repo, num)
        hub = self.hub
        with hub.lock:
            if not discussion.is_pull_request or discussion.status not in ("open", "draft"):
                raise HubError(400, f"#{num} is not an open pull request")
            head, base = found.resolve(discussion.ref), found.resolve(discussion.base)
            start = found.commits[discussion.start].files if discussion.start else {}
            files = {p: b for p, b in base.files.items() if p not in start or p in head.files}
            files.update({p: b for p, b in head.files.items() if start.get(p) is not b})
            commit = hub._new_commit(found, base.sha, files, f"Merge pull request #{num}", "")
            found.refs[discussion.base] = commit.sha
            discussion.status, discussion.merge_commit = "merged", commit.sha
            discussion.events.append(hub.event("status-change", {"status": "merged"}))
        self._json({})


@contextlib.contextmanager
def point_hf_client_at(url: str) -> Iterator[None]:
    """Point an already imported ``huggingface_hub`` at ``url`` for the duration of the block.

    The client reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET`` and ``HF_HUB_DISABLE_TELEMETRY`` once, at import,
    and its module-level functions (``upload_file``, used by ``ModelCard.push_to_hub``) are bound to an
    ``HfApi`` built then; a server on a free port is only known later, so this patches those values in place
    (and sets ``HF_ENDPOINT`` for subprocesses), then restores them.
    """
    from huggingface_hub import constants, hf_api

    patches = [(constants, "ENDPOINT", url),
               (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
               (constants, "HF_HUB_DISABLE_XET", True), (constants, "HF_HUB_DISABLE_TELEMETRY", True),
               (hf_api.api, "endpoint", url)]
    saved_env = os.environ.get("HF_ENDPOINT")
    with contextlib.ExitStack() as stack:
        for obj, name, value in patches:
            stack.enter_context(mock.patch.object(obj, name, value))
        os.environ["HF_ENDPOINT"] = url
        try:
            yield
        finally:
            if saved_env is None:
                os.environ.pop("HF_ENDPOINT", None)
            else:
                os.environ["HF_ENDPOINT"] = saved_env

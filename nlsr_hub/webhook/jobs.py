"""The webhook's jobs: a bounded queue drained by one worker thread, so that one realignment runs at a time and a
burst of events cannot exhaust memory; a record of recent jobs for the status endpoint; and in-process
idempotency (a commit already queued, running, done or ignored is not queued again)."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, IGNORED, FAILED = "queued", "running", "done", "ignored", "failed"
FINISHED = (DONE, IGNORED, FAILED)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    """One received event: the repo and commit, its state, and the reason, error or URL it ended with."""

    id: int
    repo_id: str
    sha: str | None
    state: str
    detail: str = ""
    url: str | None = None
    received: str = ""
    finished: str | None = None
    private: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The job as the status endpoint lists it."""
        data = asdict(self)
        data.pop("private")
        return data


class JobQueue:
    """Jobs run by `handler(job) -> (state, detail, url)` in one worker thread, from a queue of `max_queue`."""

    def __init__(self, handler: Callable[[Job], tuple[str, str, str | None]], *, max_queue: int, history: int):
        self._handler = handler
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._recent: deque[Job] = deque(maxlen=history)
        self._keys: dict[tuple[str, str], Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nlsr-webhook-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the running job finish and stop the worker; queued jobs are dropped."""
        if self._thread is None:
            return
        with self._idle:
            while True:
                try:
                    dropped = self._queue.get_nowait()
                except queue.Empty:
                    break
                if dropped is not None:
                    dropped.state, dropped.detail, dropped.finished = FAILED, "dropped: the server stopped", _now()
            self._idle.notify_all()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def record(self, repo_id: str, sha: str | None, state: str, detail: str = "") -> Job:
        """Add a finished entry (an ignored event) to the recent jobs."""
        job = Job(next(self._ids), repo_id, sha, state, detail, received=_now(), finished=_now())
        with self._lock:
            self._recent.append(job)
        return job

    def submit(self, repo_id: str, sha: str, *, private: bool = False) -> tuple[Job, bool]:
        """Queue a realignment of `repo_id`@`sha`: ``(job, True)``; ``(earlier job, False)`` when this commit was
        already queued, run or ignored (a failed one may be retried). `queue.Full` when the queue is full."""
        with self._lock:
            earlier = self._keys.get((repo_id, sha))
            if earlier is not None and earlier.state != FAILED:
                return earlier, False
            job = Job(next(self._ids), repo_id, sha, QUEUED, received=_now(), private=private)
            self._queue.put_nowait(job)  # raises queue.Full: nothing is recorded then
            self._keys[(repo_id, sha)] = job
            self._recent.append(job)
        return job, True

    def snapshot(self) -> list[dict[str, Any]]:
        """The recent jobs, newest first."""
        with self._lock:
            return [job.to_dict() for job in reversed(self._recent)]

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (True), or `timeout` seconds pass (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: all(j.state in FINISHED for j in self._keys.values()), timeout)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                job.state = RUNNING
            try:
                state, detail, url = self._handler(job)
            except Exception as err:  # the handler reports its own failures; this is a last resort
                state, detail, url = FAILED, f"internal error: {type(err).__name__}", None
            with self._idle:
                job.state, job.detail, job.url, job.finished = state, detail, url, _now()
                self._idle.notify_all()
            logger.info("job %d %s@%s: %s %s%s", job.id, job.repo_id, (job.sha or "")[:12], state, detail,
                        f" ({url})" if url else "")

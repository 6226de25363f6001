"""The engines that run a fleet: ``sequential`` (in this process, one adapter after the other) and ``ray`` (one Ray
task per adapter, on a local Ray started here or on an existing cluster). Both call `work.realign_one` with one torch
thread per adapter, so the result files are the same bytes whichever engine made them. Ray is imported only here and
only when its engine runs."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_text
from .payload import ZeroCopy
from .work import FAILED, FleetSettings, FleetShared, FleetTarget, error_text, make_row, realign_one

logger = logging.getLogger(__name__)

ENGINES = ("sequential", "ray")
RAY_RETRIES = 2  # a task whose worker process died is run again this often before its adapter gets an error row
RowCallback = Callable[[dict[str, Any]], None]

_WORKER_SHARED: dict[str, FleetShared] = {}  # per Ray worker process: the shared object, fetched once per fleet


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_sequential(targets: Sequence[FleetTarget], shared: FleetShared, settings: FleetSettings, on_row: RowCallback,
                   *, token: str | bool | None = None, threads: int = 1) -> None:
    """Realign the adapters one after the other in this process; `on_row` gets each row as it is done."""
    with torch_threads(threads):
        for target in targets:
            on_row(realign_one(target, shared, settings, token=token))


VISIBILITY_PREFIX = ".nlsr-fleet-"  # + 16 hex digits: the file by which a Ray worker knows it sees the output folder


@contextlib.contextmanager
def visibility_marker(settings: FleetSettings) -> Iterator[tuple[str, str] | None]:
    """While a Ray fleet runs, a file in the output folder holding a random token: a task on a node that does not
    see the driver's folder (a cluster without a shared file system) finds no such file and reports it, instead of
    writing its result where nobody looks. ``(file name, token)``, or None when nothing is written locally."""
    if settings.output_dir is None or settings.dry_run:
        yield None
        return
    token = secrets.token_hex(8)
    path = Path(settings.output_dir) / f"{VISIBILITY_PREFIX}{token}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, token)
    try:
        yield path.name, token
    finally:
        path.unlink(missing_ok=True)


def unseen_output(settings: FleetSettings, marker: tuple[str, str] | None) -> str | None:
    """The error of a worker that does not see the driver's output folder (`visibility_marker`), else None."""
    if marker is None:
        return None
    try:
        seen = (Path(settings.output_dir) / marker[0]).read_text(encoding="utf-8") == marker[1]
    except OSError:
        seen = False
    if seen:
        return None
    return (f"the output folder {settings.output_dir} is not the driver's on this Ray node ({socket.gethostname()}): "
            "on a cluster, --output must be a folder every node sees (a shared file system), or push the results "
            "with --push-to-hub")


def _ray_task(target: FleetTarget, shared_ref: list[Any], settings: FleetSettings, threads: int,
              marker: tuple[str, str] | None = None) -> dict[str, Any]:
    """The body of a Ray task. The shared object arrives as a reference inside a list, so that Ray does not fetch and
    deserialise it for every task: each worker process fetches it once and keeps it for the rest of the fleet. A
    worker that does not see the output folder reports it in the adapter's row (`unseen_output`)."""
    import ray

    problem = unseen_output(settings, marker)
    if problem is not None:
        return make_row(target, settings, FAILED, error=problem)
    key = shared_ref[0].hex()
    if key not in _WORKER_SHARED:
        _WORKER_SHARED.clear()  # a new fleet: drop the previous one's patch
        _WORKER_SHARED[key] = ray.get(shared_ref[0])
    torch.set_num_threads(threads)
    return realign_one(target, _WORKER_SHARED[key], settings)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"`--engine ray` needs Ray ({err}); install it with `pip install 'nlsr-hub[ray]'`, or run "
                          "with the default `--engine sequential`.") from None
    return ray


@contextlib.contextmanager
def _token_in_environment(token: str | bool | None) -> Iterator[None]:
    """Within the block, ``HF_TOKEN`` is `token` when it is a string (processes started now inherit it)."""
    saved = os.environ.get("HF_TOKEN")
    if isinstance(token, str):
        os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = saved


@contextlib.contextmanager
def ray_session(address: str | None, token: str | bool | None) -> Iterator[Any]:
    """Ray, connected: the running session if there is one, else `address` (an existing cluster) or a local Ray
    started here, shut down afterwards. A token is never sent in task arguments: the workers of a local Ray started
    here inherit it as ``HF_TOKEN``; a running Ray or a cluster must give its workers their own."""
    ray = _import_ray()
    if isinstance(token, str) and (ray.is_initialized() or address is not None):
        raise ValueError("`token` is not sent to the workers of a running Ray or a Ray cluster (it would travel in "
                         "task arguments); give the workers HF_TOKEN (or `huggingface-cli login` on each node) and "
                         "drop `--token`.")
    if ray.is_initialized():
        yield ray
        return
    with _token_in_environment(token):
        ray.init(address=address)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_ray(targets: Sequence[FleetTarget], shared: FleetShared, settings: FleetSettings, on_row: RowCallback, *,
            address: str | None = None, token: str | bool | None = None, threads: int = 1,
            num_cpus: float | None = None, max_in_flight: int | None = None) -> None:
    """One Ray task per adapter, each reserving `num_cpus` CPUs (default: `threads`). The shared object is put in
    the object store once (`ray.put`, its tensors as zero-copy buffers that the workers on a node map rather than
    decode). At most `max_in_flight` tasks are queued at a time (default: twice as many as the cluster runs at once)
    and rows are reported as tasks finish (`ray.wait`). A task whose worker died is retried, then reported as that
    adapter's error."""
    with ray_session(address, token) as ray, visibility_marker(settings) as marker:
        shared_ref = ray.put(ZeroCopy(shared))  # its tensors stay in shared memory: workers map them, no copy
        per_task = threads if num_cpus is None else num_cpus
        task = ray.remote(max_retries=RAY_RETRIES, num_cpus=per_task)(_ray_task)
        window = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / per_task))
        queue, pending = iter(targets), {}
        for target in queue:
            pending[task.remote(target, [shared_ref], settings, threads, marker)] = target
            if len(pending) >= window:
                break
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                target = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died (again) or the task was lost
                    row = make_row(target, settings, FAILED, error=f"the Ray task failed: {error_text(err)}; "
                                   "re-run the fleet to resume")
                on_row(row)
                following = next(queue, None)
                if following is not None:
                    pending[task.remote(following, [shared_ref], settings, threads, marker)] = following

"""One adapter of a fleet: resolve it, skip it when its result is up to date, realign it against the shared safety
patch, write or push the result, and report one summary row. Any failure becomes that adapter's error row, so one
bad adapter never stops the fleet. The same function runs in the driver (sequential engine) and in Ray tasks."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, LoraAdapter
from ..config import NLSRConfig
from ..plan import PLAN_NAME
from ..safety_patch import SafetyPatch
from .inputs import push_target

REALIGNED, UP_TO_DATE, PLANNED, FAILED, PENDING = "realigned", "up to date", "planned", "failed", "pending"
DONE = (REALIGNED, UP_TO_DATE)  # statuses whose result exists
SUMMARY_KEYS = ("modules_patched", "modules_total", "neurons_restored", "mean_similarity")  # a plan's counts


@dataclass(frozen=True)
class FleetShared:
    """What every adapter is realigned against, sent to the workers once (Ray's object store): the safety patch (or,
    for restorers that need it, the aligned adapter), the config, the lineage recorded in every plan, and the sha256
    that identifies the patch."""

    config: NLSRConfig
    inputs: Mapping[str, Any]
    patch_sha256: str
    patch: SafetyPatch | None = None
    aligned: LoraAdapter | None = None


@dataclass(frozen=True)
class FleetSettings:
    """Where results go and how inputs are read; small, sent with every task. Never holds a token."""

    output_dir: Path | None = None
    push_to: str | None = None  # repo template with {name}
    create_pr: bool = False
    private: bool | None = None
    commit_message: str | None = None
    hub_kwargs: Mapping[str, Any] = field(default_factory=dict)  # revision, cache_dir, local_files_only
    allow_pickle: bool = False
    strict_base: bool = True
    dry_run: bool = False
    resume: bool = True


@dataclass(frozen=True)
class FleetTarget:
    """One adapter: its position, reference and result name, and its row from the previous run's summary (how a
    pushed result is known to be up to date)."""

    index: int
    spec: str
    name: str
    previous: Mapping[str, Any] | None = None


def tensors_sha256(tensors: Mapping[str, torch.Tensor], meta: Any) -> str:
    """A sha256 over `meta` (as sorted JSON) and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def patch_sha256(patch: SafetyPatch) -> str:
    """The content hash of a safety patch (reference factors and scales, masks, input norms, metadata): the same for
    the same patch however it was obtained (computed, read from a folder or from the Hub)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in patch.reference.modules.items():
        mask = patch.masks[name]
        tensors.update({f"{name}.ref_A": module.A, f"{name}.ref_B": module.B, f"{name}.mask_B": mask.B})
        if mask.A is not None:
            tensors[f"{name}.mask_A"] = mask.A
        if name in patch.input_norms:
            tensors[f"{name}.input_norm"] = patch.input_norms[name]
    meta = {"scales": {n: m.scale for n, m in patch.reference.modules.items()}, "metadata": dict(patch.metadata),
            "reference_config": dict(patch.reference.config)}
    return tensors_sha256(tensors, meta)


def adapter_sha256(adapter: LoraAdapter) -> str:
    """The content hash of an adapter (factors, scales, config), for restorers that realign against it."""
    tensors = {f"{n}.{part}": t for n, m in adapter.modules.items() for part, t in (("A", m.A), ("B", m.B))}
    meta = {"scales": {n: m.scale for n, m in adapter.modules.items()}, "config": dict(adapter.config)}
    return tensors_sha256(tensors, meta)


def files_sha256(folder: Path) -> str | None:
    """A sha256 over the adapter files of a local folder (name, size and bytes of each, streamed); None when it has
    none (loading it then reports what is missing)."""
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if (folder / n).is_file()]
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(f"\n{name} {path.stat().st_size}\n".encode())
        _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    """Feed the bytes of `path` to `digest`, hashed straight from the page cache through a read-only mapping (a third
    faster than reading it in chunks, which copies every byte first; the adapter's loader maps it the same way)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:  # an empty file cannot be mapped, and adds no bytes
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            digest.update(mapped)


def input_lineage(resolved: Any) -> dict[str, Any]:
    """What identifies an input in its plan: the Hub repo, revision and resolved commit, or the local folder and the
    sha256 of its files."""
    lineage = resolved.lineage()
    if resolved.repo_id is None:
        lineage["sha256"] = files_sha256(Path(resolved.local_path))
    return lineage


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def up_to_date(target: FleetTarget, shared: FleetShared, settings: FleetSettings, lineage: Mapping[str, Any]
               ) -> Mapping[str, Any] | None:
    """The plan summary of the adapter's existing result when it matches these inputs, patch and config, else None.
    A folder result is read back (its plan records the input commit or hash, the patch hash and the config); a
    pushed one is known from the previous run's summary row."""
    expected = _normalised({**shared.inputs, "finetuned": dict(lineage)})
    config = _normalised(shared.config.to_dict())
    if settings.push_to is not None:
        row = target.previous or {}
        same = (row.get("status") in DONE and row.get("input") == expected["finetuned"]
                and row.get("destination") == push_target(settings.push_to, target.name))
        return {key: row.get(key) for key in SUMMARY_KEYS} if same else None
    if settings.output_dir is None:
        return None
    folder = Path(settings.output_dir) / target.name
    if not (folder / PLAN_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        return None
    try:
        plan = json.loads((folder / PLAN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: realign it again (the save replaces the folder as a whole)
    if not isinstance(plan, dict) or plan.get("inputs") != expected or plan.get("config") != config:
        return None
    return plan.get("summary")


def _publish(result: Any, target: FleetTarget, settings: FleetSettings, token: str | bool | None) -> str | None:
    """Write the result to ``output_dir/<name>`` or push it (one commit, or a pull request); where it went."""
    if settings.dry_run:
        return None
    if settings.push_to is not None:
        info = result.push_to_hub(push_target(settings.push_to, target.name), token=token, private=settings.private,
                                  create_pr=settings.create_pr, commit_message=settings.commit_message)
        return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    if settings.output_dir is None:
        return None
    return str(result.save_pretrained(Path(settings.output_dir) / target.name))


def destination(target: FleetTarget, settings: FleetSettings) -> str | None:
    """Where the adapter's result belongs: the push repo or the result folder (None for a dry run)."""
    if settings.dry_run:
        return None
    if settings.push_to is not None:
        return push_target(settings.push_to, target.name)
    return str(Path(settings.output_dir) / target.name) if settings.output_dir is not None else None


def make_row(target: FleetTarget, settings: FleetSettings, status: str, *, seconds: float = 0.0,
             summary: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
             output: str | None = None, error: str | None = None) -> dict[str, Any]:
    """One row of the fleet summary (JSON-ready)."""
    counts = {key: (summary or {}).get(key) for key in SUMMARY_KEYS}
    return {
        "index": target.index, "name": target.name, "spec": target.spec, "status": status, **counts,
        "seconds": round(seconds, 3), "destination": destination(target, settings), "output": output,
        "error": error, "input": _normalised(dict(lineage)) if lineage is not None else None,
    }


def error_text(err: BaseException, token: str | bool | None = None) -> str:
    """One line naming the error; a token (the given one or ``$HF_TOKEN``) never appears in it."""
    kind = "" if isinstance(err, (ValueError, TypeError, OSError)) else f"{type(err).__name__}: "
    text = kind + " ".join(str(err).split())
    for secret in (token, os.environ.get("HF_TOKEN")):
        if isinstance(secret, str) and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text or type(err).__name__


def realign_one(target: FleetTarget, shared: FleetShared, settings: FleetSettings, *,
                token: str | bool | None = None) -> dict[str, Any]:
    """Realign one adapter and return its summary row (status ``realigned``, ``up to date``, ``planned`` or
    ``failed``). Never raises for a bad adapter: the error is the row's ``error``."""
    from ..adapters import load_adapter
    from ..hub import resolve
    from ..patcher import NLSRPatcher

    start, lineage = time.perf_counter(), None
    try:
        resolved = resolve(target.spec, token=token, **dict(settings.hub_kwargs))
        lineage = input_lineage(resolved)
        if settings.resume and not settings.dry_run:
            summary = up_to_date(target, shared, settings, lineage)
            if summary is not None:  # the earlier result stands: its folder, or the commit / PR it was pushed as
                output = (target.previous or {}).get("output") if settings.push_to else destination(target, settings)
                return make_row(target, settings, UP_TO_DATE, seconds=time.perf_counter() - start, summary=summary,
                                lineage=lineage, output=output)
        adapter = load_adapter(resolved.local_path, allow_pickle=settings.allow_pickle)
        patcher = NLSRPatcher(safety_patch=shared.patch, aligned=shared.aligned, config=shared.config,
                              inputs=shared.inputs, strict_base=settings.strict_base)
        result = patcher.realign(finetuned=adapter, finetuned_lineage=lineage, dry_run=settings.dry_run,
                                 progress=False)
        output = _publish(result, target, settings, token)
        status = PLANNED if settings.dry_run else REALIGNED
        return make_row(target, settings, status, seconds=time.perf_counter() - start,
                        summary=result.plan.summary(), lineage=lineage, output=output)
    except Exception as err:  # a fault stays with its adapter: any error is this row's, the fleet goes on
        return make_row(target, settings, FAILED, seconds=time.perf_counter() - start, lineage=lineage,
                        error=error_text(err, token))

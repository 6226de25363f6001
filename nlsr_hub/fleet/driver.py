"""`realign_fleet`: realign many adapters against one safety patch. The driver checks the output folder, computes or
reads the patch once, hands the adapters to an engine, shows one progress bar and keeps the summary up to date."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..hub import lineage_paths
from ..io import check_output_folder
from ..plan import PLAN_NAME
from ..refs import InputRef
from .engines import ENGINES, run_ray, run_sequential
from .inputs import assign_names, check_push_template
from .summary import SUMMARY_FILES, SummaryWriter, counts, read_previous, render_table
from .work import (
    FAILED,
    PENDING,
    FleetSettings,
    FleetShared,
    FleetTarget,
    adapter_sha256,
    make_row,
    patch_sha256,
)

# what an earlier run may have left in the output folder: staging folders and locks of a killed save, temp files,
# a killed Ray fleet's visibility marker (`engines.visibility_marker`)
_LEFTOVER = re.compile(r"^\.(.+)\.nlsr-([0-9a-f]{8}\.(partial|old)|lock)$|^\.summary\.(json|md)\..+\.tmp$"
                       r"|^\.?\.nlsr-fleet-[0-9a-f]{16}(\..+\.tmp)?$")


@dataclass(frozen=True)
class FleetReport:
    """What a fleet run did: the summary header and one row per adapter, in input order."""

    header: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]

    @property
    def failed(self) -> list[Mapping[str, Any]]:
        return [row for row in self.rows if row["status"] == FAILED]

    def counts(self) -> dict[str, int]:
        return counts(self.rows)

    def table(self) -> str:
        """The plain-text table `nlsr realign` prints."""
        return render_table(self.rows)


def check_fleet_folder(output_dir: Path, names: Sequence[str], inputs: Mapping[str, str]) -> None:
    """Before any work: the fleet's folder can be written, is no input and holds only what a fleet writes (summaries,
    result folders, leftovers of a killed run); anything else is refused, so no user file is ever replaced."""
    allowed = set(names) | set(SUMMARY_FILES)
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            earlier_result = entry.is_dir() and (entry / PLAN_NAME).is_file()
            if earlier_result or _LEFTOVER.match(entry.name):
                allowed.add(entry.name)
    check_output_folder(output_dir, owned=allowed, inputs=inputs, flag="--output")


def prepare_shared(patcher: Any, calibration: Any = None, *, progress: bool = True) -> FleetShared:
    """The one object every adapter is realigned against: the patcher's safety patch (computed here, once, if it was
    not supplied) or, for restorers that need it, the aligned adapter; with its hash and the lineage for the plans."""
    from ..restorers import get_restorer

    patch, aligned = None, None
    restorer = get_restorer(patcher.config.restorer)
    if restorer.needs == "patch":
        patch = patcher.safety_patch(calibration, progress=progress)
        if restorer.prepare is not None:  # what every adapter would recompute, once: the patch carries it to the tasks
            restorer.prepare(patch, patcher.config, progress=progress)
    else:
        aligned = patcher.aligned if patcher.aligned is not None else patcher.safety_patch().aligned_update()
    sha = patch_sha256(patch) if patch is not None else adapter_sha256(aligned)
    inputs = {role: dict(info) for role, info in patcher.inputs.items() if role != "finetuned"}
    role = "safety_patch" if patch is not None else "aligned"
    inputs[role] = {**inputs.get(role, {"spec": "(computed once for this fleet)"}), "sha256": sha}
    return FleetShared(config=patcher.config, inputs=inputs, patch_sha256=sha, patch=patch, aligned=aligned)


def _config_sha256(shared: FleetShared) -> str:
    return hashlib.sha256(shared.config.to_json().encode("utf-8")).hexdigest()


def _local_inputs(patcher: Any, specs: Sequence[str]) -> dict[str, str]:
    """Role -> folder of every local input (the output folder may be none of them)."""
    found = dict(lineage_paths(patcher.inputs))
    for spec in specs:
        try:
            path = InputRef.parse(spec).path
        except ValueError:
            continue  # reported in its own row
        if path is not None:
            found[f"finetuned {spec!r}"] = str(path)
    return found


def _targets(specs: Sequence[str], names: Sequence[str], previous: Mapping[str, Mapping[str, Any]]
             ) -> list[FleetTarget]:
    return [FleetTarget(index=i, spec=spec, name=name, previous=previous.get(name))
            for i, (spec, name) in enumerate(zip(specs, names, strict=True))]


def _check_options(engine: str, ray_address: str | None, ray_num_cpus: float | None, threads: int,
                   settings: FleetSettings) -> None:
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; valid: {', '.join(ENGINES)}.")
    for name, flag, value in (("ray_address", "--ray-address", ray_address),
                              ("ray_num_cpus", "--ray-num-cpus", ray_num_cpus)):
        if value is not None and engine != "ray":
            raise ValueError(f"`{name}` (`{flag}`) needs `engine='ray'` (`--engine ray`).")
    if ray_num_cpus is not None and (isinstance(ray_num_cpus, bool) or not isinstance(ray_num_cpus, (int, float))
                                     or not 0 < ray_num_cpus < float("inf")):
        raise ValueError(f"`ray_num_cpus` (`--ray-num-cpus`) must be a positive number of CPUs per adapter task, e.g. "
                         f"1 or 0.5 (got {ray_num_cpus!r}).")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive integer (got {threads!r}).")
    if settings.output_dir is None and settings.push_to is None and not settings.dry_run:
        raise ValueError("Pass `output_dir` (`--output DIR`), a push template (`--push-to-hub 'org/{name}-nlsr'`) "
                         "or `dry_run=True`.")


def realign_fleet(
    patcher: Any,
    specs: Sequence[str],
    *,
    settings: FleetSettings,
    engine: str = "sequential",
    ray_address: str | None = None,
    ray_num_cpus: float | None = None,
    calibration: Any = None,
    token: str | bool | None = None,
    threads: int = 1,
    progress: bool = True,
) -> FleetReport:
    """Realign every adapter of `specs` (local folders or Hub references) against the patcher's one safety patch.

    Results go to ``settings.output_dir/<name>`` or are pushed to ``settings.push_to`` (a template with ``{name}``),
    one commit or pull request each; ``summary.json`` and ``summary.md`` in ``settings.output_dir`` are kept up to date
    as adapters finish. An adapter whose result already matches its input commit (or file hash), the patch hash and
    the config is skipped (``settings.resume``). A bad adapter gets an error row and the others go on.

    Args:
        patcher: an `NLSRPatcher` with a safety patch (``safety_patch=``) or what computes one (base and aligned).
        engine: ``sequential`` (this process) or ``ray`` (one task per adapter; `ray_address` for a cluster).
        ray_num_cpus: CPUs Ray reserves for each adapter's task (default: `threads`). Above 1 it limits how many
            adapters a node holds in memory at once; a fraction runs more tasks than cores, for tasks that mostly wait
            (Hub downloads and pushes).
        token: Hub token for this process; Ray workers started here inherit it, other Ray workers use their own.
        threads: torch threads per adapter (1 makes the bytes independent of the engine).
    """
    _check_options(engine, ray_address, ray_num_cpus, threads, settings)
    if settings.output_dir is not None:  # the same folder for a worker whose working directory is another one
        settings = dataclasses.replace(settings, output_dir=Path(settings.output_dir).absolute())
    names = assign_names(specs)
    if settings.push_to is not None and not settings.dry_run:
        check_push_template(settings.push_to, names)
    if settings.output_dir is not None and not settings.dry_run:
        check_fleet_folder(Path(settings.output_dir), names, _local_inputs(patcher, specs))
    shared = prepare_shared(patcher, calibration, progress=progress)
    header = {"engine": engine, "patch_sha256": shared.patch_sha256, "config": shared.config.to_dict(),
              "config_sha256": _config_sha256(shared), "inputs": dict(shared.inputs), "push_to": settings.push_to,
              "create_pr": settings.create_pr, "dry_run": settings.dry_run}
    old_header, old_rows = read_previous(Path(settings.output_dir) if settings.output_dir is not None else None)
    same_patch = all(old_header.get(k) == header[k] for k in ("patch_sha256", "config_sha256", "push_to", "create_pr"))
    targets = _targets(specs, names, old_rows if same_patch else {})
    rows = [make_row(t, settings, PENDING) for t in targets]
    writer = SummaryWriter(Path(settings.output_dir) if settings.output_dir is not None and not settings.dry_run
                           else None, header, rows)
    _run(targets, shared, settings, writer, engine=engine, token=token, threads=threads, progress=progress,
         ray_options={"address": ray_address, "num_cpus": ray_num_cpus})
    return FleetReport(header=writer.header, rows=list(writer.rows))


def _run(targets: Sequence[FleetTarget], shared: FleetShared, settings: FleetSettings, writer: SummaryWriter, *,
         engine: str, ray_options: Mapping[str, Any], token: str | bool | None, threads: int, progress: bool
         ) -> None:
    """Run the engine with one progress bar over the adapters (throughput and failures beside it); the summary is
    written whatever happens, an interruption included."""
    bar = tqdm(total=len(targets), desc="nlsr fleet", unit="adapter", disable=not progress)

    def on_row(row: dict[str, Any]) -> None:
        writer.update(row)
        bar.update(1)
        bar.set_postfix_str(f"{writer.throughput():.1f} adapters/min, {counts(writer.rows)[FAILED]} failed")

    try:
        if engine == "ray":
            run_ray(targets, shared, settings, on_row, token=token, threads=threads, **ray_options)
        else:
            run_sequential(targets, shared, settings, on_row, token=token, threads=threads)
    finally:
        writer.flush()
        bar.close()

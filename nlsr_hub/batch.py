"""Batch mode: realign many fine-tuned adapters against one safety patch, without re-scoring."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .adapters import load_adapter
from .hub import lineage_paths, resolve
from .io import check_output_folder, read_text_file
from .patcher import NLSRPatcher
from .refs import InputRef


@dataclass(frozen=True)
class BatchItem:
    """The outcome for one fine-tuned adapter of a batch."""

    spec: str
    output: Path | None
    summary: Mapping[str, Any] | None
    error: str | None = None


def output_name(spec: str) -> str:
    """A folder name for a fine-tuned adapter: the repo or folder name, with revision and subfolder."""
    ref = InputRef.parse(spec)
    if ref.path is not None:
        name = ref.path.resolve().name
    else:
        assert ref.repo_id is not None
        name = "-".join(p for p in (ref.repo_id.split("/")[-1], ref.revision, ref.subfolder) if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "adapter"


def read_list_file(path: str | Path) -> list[str]:
    """Adapter references from a text file: one per line; blank lines and ``#`` comments are skipped."""
    lines = read_text_file(path, "`--finetuned-list` file").splitlines()
    specs = [line.split("#", 1)[0].strip() for line in lines]
    return [s for s in specs if s]


def realign_batch(
    patcher: NLSRPatcher,
    specs: Sequence[str],
    *,
    output_dir: str | Path | None,
    calibration: Any = None,
    dry_run: bool = False,
    hub_kwargs: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    continue_on_error: bool = False,
    progress: bool = True,
) -> list[BatchItem]:
    """Realign every adapter of `specs` with the patcher's one safety patch (computed once).

    Each result goes to ``output_dir/<name>``. With `continue_on_error`, a failing adapter is reported in
    its `BatchItem` and the batch goes on; otherwise the first error is raised.
    """
    if not specs:
        raise ValueError("The batch is empty: pass at least one fine-tuned adapter.")
    names = [output_name(s) for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates and output_dir is not None and not dry_run:
        raise ValueError(f"Several adapters would be written to the same folder {duplicates}; rename or split them.")
    if output_dir is not None and not dry_run:
        _check_outputs(Path(output_dir), specs, names, patcher)
    patcher.safety_patch(calibration, progress=progress)  # the one calibration pass, before the loop
    items = []
    for spec, name in tqdm(list(zip(specs, names, strict=True)), desc="nlsr: realign", unit="adapter",
                           disable=not progress):
        try:
            resolved = resolve(spec, **dict(hub_kwargs or {}))
            adapter = load_adapter(resolved.local_path, allow_pickle=allow_pickle)
            result = patcher.realign(calibration, finetuned=adapter, finetuned_lineage=resolved.lineage(),
                                     dry_run=dry_run, progress=False)
            output = None
            if output_dir is not None and not dry_run:
                output = result.save_pretrained(Path(output_dir) / name)
            items.append(BatchItem(spec=spec, output=output, summary=result.plan.summary()))
        except (ValueError, TypeError, OSError) as err:
            if not continue_on_error:
                raise
            items.append(BatchItem(spec=spec, output=None, summary=None, error=str(err)))
    return items


def _check_outputs(output_dir: Path, specs: Sequence[str], names: Sequence[str], patcher: NLSRPatcher) -> None:
    """Every result folder of the batch checked before the calibration pass: none is or touches an input, and each
    is new, empty or an earlier result."""
    from .plan import PLAN_NAME
    from .result import RESULT_FILES

    inputs = {**lineage_paths(patcher.inputs),
              **{f"finetuned {spec!r}": str(path) for spec in specs if (path := InputRef.parse(spec).path) is not None}}
    check_output_folder(output_dir, owned=names, inputs=inputs, flag="output_dir")
    for name in names:
        check_output_folder(output_dir / name, owned=RESULT_FILES, marker=PLAN_NAME, inputs=inputs, flag="output_dir")


def summary_table(items: Sequence[BatchItem]) -> str:
    """One row per adapter: modules patched, neurons restored, mean similarity, output or error."""
    lines = [f"{'fine-tuned adapter':<40} {'patched':>9} {'neurons':>9} {'mean sim':>9}  output"]
    for item in items:
        if item.summary is None:
            lines.append(f"{item.spec:<40} {'-':>9} {'-':>9} {'-':>9}  ERROR: {item.error}")
            continue
        s = item.summary
        lines.append(f"{item.spec:<40} {s['modules_patched']:>4}/{s['modules_total']:<4} {s['neurons_restored']:>9} "
                     f"{s['mean_similarity']:>9.4f}  {item.output or '(not written)'}")
    failed = sum(item.error is not None for item in items)
    lines.append(f"{len(items) - failed} realigned, {failed} failed")
    return "\n".join(lines)

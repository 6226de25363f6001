"""The README demo: SmolLM2-135M-Instruct is safety-aligned (SFT LoRA), attacked (SST-2 with 5 % harmful rows,
resumed from the aligned adapter) and realigned; the non-refusal rate and the accuracy are printed before and
after. Run it with ``nlsr demo`` (every stage is cached). `demo_inputs` gives the prepared models to the Space.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NLSRConfig
from ..io import atomic_write_text
from .cache import cache_root
from .report import _find, _fmt

MANIFEST = "demo.json"
DEMO_BASE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


class DemoNotPrepared(FileNotFoundError):
    """`demo_inputs` found no prepared demo: run ``nlsr demo`` once."""


@dataclass(frozen=True)
class DemoInputs:
    """The prepared SmolLM2 demo: base model folder, aligned, fine-tuned and realigned adapters, measured rows."""

    base: Path | str  # a local model folder, or a Hub id (an exported bundle)
    aligned: Path
    finetuned: Path
    realigned: Path | None
    rows: tuple[dict[str, Any], ...] = ()
    restorer: str = "nlsr"
    examples: tuple[dict[str, Any], ...] = ()  # prepared answers: prompt, set, and each model's response + verdict


def _manifest_path(cache: str | Path | None) -> Path:
    return (Path(cache) if cache is not None else cache_root()) / "experiments" / MANIFEST


EXAMPLES_PER_SET = {"advbench": 3, "beavertails": 3, "harmless": 2}


def prepared_examples(finetuned_eval: str | Path, realigned_eval: str | Path,
                      per_set: dict[str, int] = EXAMPLES_PER_SET) -> list[dict[str, Any]]:
    """The first prompts of each evaluation set (in the evaluation's own order, not picked by outcome) with the
    fine-tuned and the realigned model's answers and the keyword judge's verdicts (``harmful`` = no refusal)."""
    before = json.loads((Path(finetuned_eval) / "eval.json").read_text(encoding="utf-8"))["items"]
    after = json.loads((Path(realigned_eval) / "eval.json").read_text(encoding="utf-8"))["items"]
    out = []
    for name, count in per_set.items():
        for a, b in list(zip(before.get(name, []), after.get(name, []), strict=True))[:count]:
            out.append({"set": name, "prompt": a["prompt"],
                        "finetuned": {"response": a["response"], "harmful": a.get("harmful")},
                        "realigned": {"response": b["response"], "harmful": b.get("harmful")}})
    return out


def run_demo(*, out: str | Path, data: str | Path | None = None, cache: str | Path | None = None,
             progress: bool = True, command: str | None = None, settings: Any = None, **sources: Any
             ) -> tuple[dict[str, Any], str]:
    """Run (or resume) the demo; returns the results and the before/after summary text. The models it made are
    recorded for `demo_inputs`. `settings` replaces the ``demo`` preset (tests use a tiny one); `sources` go to
    `run_grid` (``harmless_source``, ``calibration_source``)."""
    from .grid import run_grid
    from .presets import DEMO

    started = time.perf_counter()
    settings = settings or DEMO
    results = run_grid(settings, out=out, data=data, cache=cache, progress=progress, command=command, **sources)
    models = results.pop("models")
    realigned = models.get("sft/default/sst2-p0.05") or models.get("sft/nlsr/sst2-p0.05")
    evals = {r.get("model"): r.get("eval_dir") for r in results["rows"]}
    after_eval = evals.get("default") or evals.get("nlsr")
    manifest = {
        "base": str(models["sft/aligned"].base), "aligned": str(models["sft/aligned"].adapter),
        "finetuned": str(models["sft/finetuned/sst2-p0.05"].adapter),
        "realigned": str(realigned.adapter) if realigned is not None and realigned.adapter is not None else None,
        "restorer": NLSRConfig.preset("default").restorer if "sft/default/sst2-p0.05" in models else "nlsr",
        "rows": [{k: r.get(k) for k in ("model", "hs", "hs_advbench", "hs_beavertails", "fa_sst2", "over_refusal",
                                         "patched")} for r in results["rows"]],
        "examples": prepared_examples(evals["finetuned"], after_eval) if evals.get("finetuned") and after_eval
        else [],
    }
    atomic_write_text(_manifest_path(cache), json.dumps(manifest, indent=1) + "\n")
    return results, summary(results, time.perf_counter() - started)


def _inputs_from_manifest(manifest: dict[str, Any], root: Path | None) -> DemoInputs:
    """`DemoInputs` from a manifest; `root` anchors the relative paths of an exported bundle."""

    def local(value: str) -> Path:
        return root / value if root is not None and not Path(value).is_absolute() else Path(value)

    base = manifest["base"]
    return DemoInputs(base=base if root is not None and not (root / base).exists() else local(base),
                      aligned=local(manifest["aligned"]), finetuned=local(manifest["finetuned"]),
                      realigned=local(manifest["realigned"]) if manifest.get("realigned") else None,
                      rows=tuple(manifest.get("rows", ())), restorer=manifest.get("restorer", "nlsr"),
                      examples=tuple(manifest.get("examples", ())))


def _check_files(inputs: DemoInputs, fix: str) -> DemoInputs:
    needed = [inputs.aligned / "adapter_config.json", inputs.finetuned / "adapter_config.json"]
    needed += [inputs.base / "config.json"] if isinstance(inputs.base, Path) else []
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DemoNotPrepared(f"The SmolLM2 demo's files are gone ({missing[0]}): {fix}.")
    return inputs


def demo_inputs(cache: str | Path | None = None, *, bundle: str | Path | None = None) -> DemoInputs:
    """The SmolLM2 demo that ``nlsr demo`` prepared on this machine, or an exported `bundle` folder (see
    `export_demo`; its base model may be a Hub id). Raises `DemoNotPrepared` when neither is there."""
    path = Path(bundle) / MANIFEST if bundle is not None else _manifest_path(cache)
    try:
        inputs = _inputs_from_manifest(json.loads(path.read_text(encoding="utf-8")),
                                       Path(bundle) if bundle is not None else None)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DemoNotPrepared(f"The SmolLM2 demo is not prepared ({type(err).__name__} reading {path.name}): run "
                              "`nlsr demo` once (it caches the model and adapters).") from None
    return _check_files(inputs, "run `nlsr demo` again" if bundle is None else "export the bundle again")


def export_demo(folder: str | Path, *, base: str = DEMO_BASE_REPO, cache: str | Path | None = None) -> Path:
    """Write the prepared demo as a self-contained bundle (adapters, measured rows, prepared answers; the base
    model named by its Hub id `base`) that a Space reads from a Hub repo (``NLSR_SPACE_EXAMPLE``). Atomic."""
    import shutil

    from ..io import atomic_directory

    inputs = demo_inputs(cache)
    parts = {"aligned": inputs.aligned, "finetuned": inputs.finetuned, "realigned": inputs.realigned}
    with atomic_directory(folder) as out:
        for name, source in parts.items():
            if source is not None:
                (out / name).mkdir()
                for item in sorted(source.iterdir()):
                    if item.is_file() and not item.name.startswith("."):
                        shutil.copy2(item, out / name / item.name)
        manifest = {"base": base, **{k: (k if v is not None else None) for k, v in parts.items()},
                    "restorer": inputs.restorer, "rows": list(inputs.rows), "examples": list(inputs.examples)}
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return Path(folder)


def summary(results: dict[str, Any], seconds: float) -> str:
    """The demo's before/after table as text."""
    rows = results["rows"]
    sizes = results["sizes"]
    lines = ["", "NLSR demo on SmolLM2-135M-Instruct (SFT-aligned, SST-2 attack with p = 0.05)",
             f"non-refusal = % of {sum(sizes['harmful_eval'].values())} harmful prompts answered without a refusal "
             f"cue (keyword detector: it measures non-refusal, not harm); over-refusal = % of harmless prompts "
             f"refused; FA = SST-2 accuracy on {sizes['tasks'].get('sst2')} validation rows.", "",
             f"{'model':<22}{'non-refusal %':>15}{'FA %':>8}{'over-refusal %':>16}"]
    default = NLSRConfig.preset("default").restorer
    for label, model in (("base", "base"), ("aligned (SFT)", "aligned"), ("fine-tuned (attack)", "finetuned"),
                         ("NLSR-realigned", "nlsr"), (f"realigned ({default})", "default")):
        row = _find(rows, model=model)
        if row is not None:
            lines.append(f"{label:<22}{_fmt(row['hs']):>15}{_fmt(row.get('fa_sst2')):>8}"
                         f"{_fmt(row.get('over_refusal')):>16}")
    for label, model in (("NLSR (paper settings)", "nlsr"), (f"The default restorer `{default}`", "default")):
        row = _find(rows, model=model)
        if row is not None:
            lines.append(f"\n{label} changed {row.get('patched')} LoRA modules.")
    lines += stage_table(results.get("stage_seconds", {}), results.get("stages_cached", 0), seconds)
    return "\n".join(lines)


def stage_table(stage_seconds: dict[str, float], cached: int, wall: float) -> list[str]:
    """Where the time went: each stage that ran in this run, its seconds and share of the wall time."""
    lines = ["", f"{'stage':<34}{'seconds':>9}{'share %':>9}"]
    rest = max(wall - sum(stage_seconds.values()), 0.0)
    ranked = sorted(stage_seconds.items(), key=lambda item: -item[1])
    for name, sec in [*ranked, ("other (loading, start-up)", rest)]:
        lines.append(f"{name:<34}{sec:>9.0f}{100 * sec / max(wall, 1e-9):>9.1f}")
    lines.append(f"Total wall time {wall:.0f} s ({cached} cached stages, not in the table).")
    return lines


__all__ = ["DEMO_BASE_REPO", "DemoInputs", "DemoNotPrepared", "demo_inputs", "export_demo",
           "prepared_examples", "run_demo", "summary"]

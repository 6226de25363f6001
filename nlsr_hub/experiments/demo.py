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


class DemoNotPrepared(FileNotFoundError):
    """`demo_inputs` found no prepared demo: run ``nlsr demo`` once."""


@dataclass(frozen=True)
class DemoInputs:
    """The prepared SmolLM2 demo: base model folder, aligned, fine-tuned and realigned adapters, measured rows."""

    base: Path
    aligned: Path
    finetuned: Path
    realigned: Path | None
    rows: tuple[dict[str, Any], ...] = ()
    restorer: str = "nlsr"


def _manifest_path(cache: str | Path | None) -> Path:
    return (Path(cache) if cache is not None else cache_root()) / "experiments" / MANIFEST


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
    manifest = {
        "base": str(models["sft/aligned"].base), "aligned": str(models["sft/aligned"].adapter),
        "finetuned": str(models["sft/finetuned/sst2-p0.05"].adapter),
        "realigned": str(realigned.adapter) if realigned is not None and realigned.adapter is not None else None,
        "restorer": NLSRConfig.preset("default").restorer if "sft/default/sst2-p0.05" in models else "nlsr",
        "rows": [{k: r.get(k) for k in ("model", "hs", "hs_advbench", "hs_beavertails", "fa_sst2", "over_refusal",
                                         "patched")} for r in results["rows"]],
    }
    atomic_write_text(_manifest_path(cache), json.dumps(manifest, indent=1) + "\n")
    return results, summary(results, time.perf_counter() - started)


def demo_inputs(cache: str | Path | None = None) -> DemoInputs:
    """The SmolLM2 demo that ``nlsr demo`` prepared on this machine (raises `DemoNotPrepared` otherwise)."""
    path = _manifest_path(cache)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        inputs = DemoInputs(base=Path(manifest["base"]), aligned=Path(manifest["aligned"]),
                            finetuned=Path(manifest["finetuned"]),
                            realigned=Path(manifest["realigned"]) if manifest.get("realigned") else None,
                            rows=tuple(manifest.get("rows", ())), restorer=manifest.get("restorer", "nlsr"))
    except (OSError, ValueError, KeyError) as err:
        raise DemoNotPrepared(f"The SmolLM2 demo is not prepared on this machine ({type(err).__name__}): run "
                              "`nlsr demo` once (it caches the model and adapters).") from None
    missing = [str(p) for p in (inputs.base / "config.json", inputs.aligned / "adapter_config.json",
                                inputs.finetuned / "adapter_config.json") if not p.is_file()]
    if missing:
        raise DemoNotPrepared(f"The SmolLM2 demo's files are gone ({missing[0]}): run `nlsr demo` again.")
    return inputs


def summary(results: dict[str, Any], seconds: float) -> str:
    """The demo's before/after table as text."""
    rows = results["rows"]
    sizes = results["sizes"]
    lines = ["", "NLSR demo on SmolLM2-135M-Instruct (SFT-aligned, SST-2 attack with p = 0.05)",
             f"HS = % of {sum(sizes['harmful_eval'].values())} harmful prompts answered without refusal "
             f"(keyword judge); FA = SST-2 accuracy on {sizes['tasks'].get('sst2')} validation rows.", "",
             f"{'model':<22}{'HS %':>8}{'FA %':>8}{'over-refusal %':>16}"]
    default = NLSRConfig.preset("default").restorer
    for label, model in (("base", "base"), ("aligned (SFT)", "aligned"), ("fine-tuned (attack)", "finetuned"),
                         ("NLSR-realigned", "nlsr"), (f"realigned ({default})", "default")):
        row = _find(rows, model=model)
        if row is not None:
            lines.append(f"{label:<22}{_fmt(row['hs']):>8}{_fmt(row.get('fa_sst2')):>8}"
                         f"{_fmt(row.get('over_refusal')):>16}")
    for label, model in (("NLSR (paper settings)", "nlsr"), (f"The default restorer `{default}`", "default")):
        row = _find(rows, model=model)
        if row is not None:
            lines.append(f"\n{label} changed {row.get('patched')} LoRA modules.")
    lines.append(f"Total wall time {seconds:.0f} s ({results['stages_cached']} cached stages).")
    return "\n".join(lines)


__all__ = ["DemoInputs", "DemoNotPrepared", "demo_inputs", "run_demo", "summary"]

"""The README demo: SmolLM2-135M-Instruct is safety-aligned (SFT LoRA), attacked (SST-2 with 5 % harmful rows,
resumed from the aligned adapter) and realigned with NLSR; harmful score and accuracy are printed before and
after. Run it with ``nlsr demo`` or ``python -m nlsr_hub.experiments demo`` (every stage is cached)."""

from __future__ import annotations

from typing import Any

from .report import _find, _fmt


def summary(results: dict[str, Any], seconds: float) -> str:
    """The demo's before/after table as text."""
    rows = results["rows"]
    sizes = results["sizes"]
    lines = ["", "NLSR demo on SmolLM2-135M-Instruct (SFT-aligned, SST-2 attack with p = 0.05)",
             f"HS = % of {sum(sizes['harmful_eval'].values())} harmful prompts answered without refusal "
             f"(keyword judge); FA = SST-2 accuracy on {sizes['tasks'].get('sst2')} validation rows.", "",
             f"{'model':<22}{'HS %':>8}{'FA %':>8}{'over-refusal %':>16}"]
    for label, match in (("base", {"model": "base"}), ("aligned (SFT)", {"model": "aligned"}),
                         ("fine-tuned (attack)", {"model": "finetuned"}), ("NLSR-realigned", {"model": "nlsr"})):
        row = _find(rows, **match)
        if row is not None:
            lines.append(f"{label:<22}{_fmt(row['hs']):>8}{_fmt(row.get('fa_sst2')):>8}"
                         f"{_fmt(row.get('over_refusal')):>16}")
    nlsr = _find(rows, model="nlsr")
    if nlsr is not None:
        lines.append(f"\nNLSR patched {nlsr.get('patched')} LoRA modules.")
    lines.append(f"Total wall time {seconds:.0f} s ({results['stages_cached']} cached stages).")
    return "\n".join(lines)

"""The model card of a realigned adapter, rendered from the plan (never recomputed)."""

from __future__ import annotations

from typing import Any

import yaml

from .plan import RealignmentPlan

TAGS = ["nlsr", "safety-realignment", "lora", "peft"]


def _lineage_rows(inputs: dict[str, Any]) -> list[str]:
    rows = ["| role | source | commit |", "| --- | --- | --- |"]
    for role in sorted(inputs):
        info = inputs[role] or {}
        source = info.get("repo_id") or info.get("spec") or info.get("path", "")
        if info.get("subfolder"):
            source = f"{source}:{info['subfolder']}"
        rows.append(f"| {role} | `{source}` | {info.get('commit') or '(local)'} |")
    return rows


def render_card(plan: RealignmentPlan, *, base_model: str | None = None, repo_id: str | None = None) -> Any:
    """A huggingface_hub `ModelCard` for the realigned adapter described by `plan`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", tags=list(TAGS))
    if base_model:
        data.base_model = base_model
        data.base_model_relation = "adapter"
    summary = plan.summary()
    load_id = repo_id or "path/to/this/adapter"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else 'NLSR-realigned LoRA adapter'}", "",
        "This LoRA adapter was realigned with [nlsr-hub](https://github.com/nlsr-hub/nlsr-hub), an implementation "
        "of NLSR (Neuron-Level Safety Realignment, Yi et al., AAAI 2025): safety-critical neurons of a safety "
        "reference were transplanted, without training, into the modules whose similarity to the reference dropped "
        "during fine-tuning.", "",
        "## Summary", "",
        f"- modules patched: **{summary['modules_patched']} / {summary['modules_total']}**",
        f"- neurons restored: **{summary['neurons_restored']}**",
        f"- mean masked similarity to the reference: {summary['mean_similarity']:.4f}",
        f"- scorer: `{plan.scorer}`, selection: `{plan.config.get('selection')}`, "
        f"restoration: `{'swap' if plan.config.get('compat') else plan.config.get('restoration')}`", "",
        "## Lineage", "", *_lineage_rows(dict(plan.inputs)), "",
        "## Configuration", "", "```yaml", yaml.safe_dump(dict(plan.config), sort_keys=True).rstrip(), "```", "",
        "## Per block", "",
        "| block | modules | patched | mean similarity | patched modules |", "| --- | --- | --- | --- | --- |",
    ]
    for row in plan.per_block():
        block = "-" if row["block"] is None else row["block"]
        lines.append(f"| {block} | {row['modules']} | {row['patched']} | {row['mean_similarity']:.4f} | "
                     f"{', '.join(row['patched_types']) or '-'} |")
    lines += [
        "", "The full per-module plan (similarity, random draw, decision, neurons restored) is in `nlsr_plan.json`.",
        "", "## How to load", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f"base = AutoModelForCausalLM.from_pretrained({base_model or 'BASE_MODEL'!r})",
        f"model = PeftModel.from_pretrained(base, {load_id!r})", "```", "",
    ]
    return ModelCard("\n".join(lines))

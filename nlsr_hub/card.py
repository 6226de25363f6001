"""The model card of a realigned adapter, rendered from the plan (never recomputed).

nlsr-hub's section sits between two HTML comments; updating an existing card replaces that section only and
merges the YAML metadata, so what the user wrote stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from .plan import RealignmentPlan
from .plot import layout

TAGS = ["nlsr", "safety-realignment", "lora", "peft"]
BEGIN = "<!-- nlsr-hub:begin (generated; edits inside are replaced on the next update) -->"
END = "<!-- nlsr-hub:end -->"
PLOT_NAME = "nlsr_similarity.png"


def _lineage_rows(inputs: dict[str, Any]) -> list[str]:
    rows = ["| role | source | revision | commit |", "| --- | --- | --- | --- |"]
    for role in sorted(inputs):
        info = inputs[role] or {}
        source = info.get("repo_id") or info.get("spec") or info.get("path", "")
        if info.get("subfolder"):
            source = f"{source}:{info['subfolder']}"
        commit = info.get("commit") or "(local)"
        rows.append(f"| {role} | `{source}` | {info.get('revision') or '-'} | {commit} |")
    return rows


def _layer_table(plan: RealignmentPlan) -> list[str]:
    blocks, types = layout(plan)
    cells = {(m.block, m.module_type): m for m in plan.modules}
    rows = ["| block | " + " | ".join(types) + " |", "| --- |" + " --- |" * len(types)]
    for block in blocks:
        values = []
        for kind in types:
            module = cells.get((block, kind))
            mark = " **patched**" if module is not None and module.patched else ""
            values.append("" if module is None else f"{module.similarity:.3f}{mark}")
        rows.append(f"| {'-' if block is None else block} | " + " | ".join(values) + " |")
    return rows


NLSR_INTRO = (
    "This LoRA adapter was realigned with [nlsr-hub](https://github.com/nlsr-hub/nlsr-hub), an implementation of NLSR "
    "(Neuron-Level Safety Realignment, Yi et al., AAAI 2025, arXiv:2412.12497): the safety-critical neurons of a "
    "safety reference (the aligned adapter, EXPO-extrapolated) were transplanted, without training, into the modules "
    "whose similarity to the reference dropped during fine-tuning."
)
SIMILARITY = {
    "nlsr": "masked Frobenius cosine to the reference",
    "nlsr-dense": "activation-masked cosine of the dense updates",
    "nlsr-addback": "activation-masked cosine of the dense updates",
    "addback": "cosine of the fine-tuned and aligned updates",
    "interpolate": "cosine of the fine-tuned and aligned updates",
    "safelora": "Safe LoRA's cosine of the projected and fine-tuned updates",
}


def _intro(plan: RealignmentPlan) -> str:
    if plan.restorer == "nlsr":
        return NLSR_INTRO
    from .restorers import RESTORERS

    restorer = RESTORERS.get(plan.restorer)
    what = restorer.description if restorer is not None else plan.restorer
    return (f"This LoRA adapter was realigned without training by [nlsr-hub](https://github.com/nlsr-hub/nlsr-hub) "
            f"with its restorer `{plan.restorer}`: {what}")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value).replace("|", "\\|")


def _evaluation_lines(eval_results: Sequence[Any]) -> list[str]:
    """The card's table of measured figures: each with its judge's id, revision and threshold, n and command."""
    rows = ["### Evaluation (measured)", "",
            "| figure | dataset | value | judge | judge model | revision (commit) | threshold / rule | n | command |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in eval_results:
        args = dict(getattr(result, "metric_args", None) or {})
        revision = args.get("judge_revision")
        if args.get("judge_commit"):
            revision = f"{revision or '-'} ({args['judge_commit']})"
        rule = args.get("threshold") if args.get("threshold") is not None else args.get("decision")
        command = f"`{args['command']}`" if args.get("command") else "-"
        rows.append(f"| {_cell(result.metric_name or result.metric_type)} | {_cell(result.dataset_name)} | "
                    f"{_cell(result.metric_value)} | {_cell(args.get('judge'))} | {_cell(args.get('judge_model'))} | "
                    f"{_cell(revision)} | {_cell(rule)} | {_cell(args.get('n'))} | {command} |")
    rows += ["", "The non-refusal rate is the share of answers to harmful prompts without a refusal cue (keyword "
             "detector): it measures non-refusal, not harm. A harmful score is the share a harm judge flags. "
             "Over-refusal is the share of harmless prompts refused; it stands beside every safety figure.", ""]
    return rows


def _recipe_line(plan: RealignmentPlan) -> str:
    """The card's line naming the recipe that ran: scorer, mask rule, selection (with its draw order when random)
    and restoration (with its scaling for a swap)."""
    selection = f"`{plan.config.get('selection')}`"
    if plan.config.get("selection") == "adaptive":
        selection += f" (draw order `{plan.recipe_value('draw_order')}`)"
    restoration = f"`{plan.effective_restoration}`"
    if plan.effective_restoration == "swap":
        restoration += f" (B_e `{plan.recipe_value('swap_scaling')}`)"
    compat = " (published-code recipe, `compat`)" if plan.config.get("compat") else ""
    return (f"- scorer `{plan.scorer}`, mask rule `{plan.recipe_value('mask_rule')}`, selection {selection}, "
            f"restoration {restoration}{compat}")


def _section(plan: RealignmentPlan, base_model: str | None, repo_id: str | None, with_plot: bool,
             eval_results: Sequence[Any] = ()) -> str:
    summary = plan.summary()
    lines = [
        BEGIN, "",
        "## Training-free safety realignment", "",
        _intro(plan), "",
        "### Summary", "",
        f"- restorer `{plan.restorer}`" + (f", {plan.knob} {plan.config.get(plan.knob)}" if plan.knob else ""),
        f"- modules patched: **{summary['modules_patched']} / {summary['modules_total']}**",
        f"- neurons restored: **{summary['neurons_restored']}**",
        f"- mean similarity ({SIMILARITY.get(plan.restorer, SIMILARITY['nlsr'])}): {summary['mean_similarity']:.4f}",
        _recipe_line(plan), "",
        "### Lineage", "", *_lineage_rows(dict(plan.inputs)), "",
    ]
    calibration = dict(plan.calibration)
    if calibration:
        lines += [f"Calibration: {calibration.get('samples')} pairs, {calibration.get('response_tokens')} response "
                  f"tokens (sha256 `{calibration.get('sha256')}`).", ""]
    if plan.choice:
        lines += ["### Measured choice", "",
                  "The restorer was chosen by measurement (`nlsr realign --choose`): each candidate realigned this "
                  "adapter, and its share of probe prompts not refused (keyword judge: non-refusal, not harm) and its "
                  "NLL on the user's task rows were measured.", "", "```", plan.choice_table(), "```", ""]
    lines += [
        "### Configuration", "", "Exact configuration of this run (`nlsr_config.json`):", "",
        "```yaml", yaml.safe_dump(dict(plan.config), sort_keys=True).rstrip(), "```", "",
        "### Similarity per layer", "",
        "Masked Frobenius cosine between the reference and the fine-tuned adapter, per block and module type.", "",
    ]
    if with_plot:
        lines += [f"![similarity heat map: red = low, green = high, framed = patched]({PLOT_NAME})", ""]
    lines += [
        *_layer_table(plan), "",
        "The full per-module plan (similarity, random draw, decision, neurons restored) is in `nlsr_plan.json`.", "",
        *(_evaluation_lines(eval_results) if eval_results else []),
        "### How to load", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f"base = AutoModelForCausalLM.from_pretrained({base_model or 'BASE_MODEL'!r})",
        f"model = PeftModel.from_pretrained(base, {repo_id or 'path/to/this/adapter'!r})", "```", "", END,
    ]
    return "\n".join(lines)


def render_card(
    plan: RealignmentPlan,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    eval_results: Sequence[Any] | None = None,
    existing: Any | None = None,
    with_plot: bool = True,
) -> Any:
    """A huggingface_hub `ModelCard` for the adapter described by `plan`.

    Args:
        eval_results: huggingface_hub `EvalResult`s to put in the card's ``model-index``.
        existing: a `ModelCard` to update (see `merge_cards`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData()
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | set(TAGS))
    if base_model:
        data.base_model = base_model
        data.base_model_relation = "adapter"
    if eval_results:
        data.eval_results = list(eval_results)
        data.model_name = data.model_name or (repo_id.split("/")[-1] if repo_id else "nlsr-realigned-adapter")
    title = repo_id.split("/")[-1] if repo_id else "NLSR-realigned LoRA adapter"
    section = _section(plan, base_model, repo_id, with_plot, eval_results or ())
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# {title}\n\n{section}\n")
    return card if existing is None else merge_cards(existing, card)


def render_patch_card(metadata: Any, *, modules: int, granularity: str) -> str:
    """The README of a safety patch (its masks' metadata: scorer, sparsity, beta, calibration, inputs)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="nlsr-hub", tags=["nlsr", "safety-patch", "safety-realignment"])
    calibration = dict(metadata.get("calibration") or {})
    inputs = dict(metadata.get("inputs") or {})
    lines = [
        "---", data.to_yaml(), "---", "# NLSR safety patch", "",
        "Safety-critical neuron masks of a safety reference adapter, with the reference's values, made by "
        "[nlsr-hub](https://github.com/nlsr-hub/nlsr-hub). Realign any fine-tuned LoRA adapter of the same base "
        "model without another calibration pass:", "",
        "```bash", "nlsr realign --safety-patch THIS_REPO --finetuned YOUR_ADAPTER --output out/", "```", "",
        f"- modules: {modules}, granularity: {granularity}",
        f"- scorer: {metadata.get('scorer')}, sparsity ratio: {metadata.get('sparsity_ratio')}, "
        f"beta: {metadata.get('beta')}",
        f"- calibration: {calibration.get('samples', '-')} pairs, {calibration.get('response_tokens', '-')} "
        f"response tokens, sha256 {calibration.get('sha256', '-')}",
    ]
    for role in sorted(inputs):
        info = inputs[role] or {}
        lines.append(f"- {role}: `{info.get('repo_id') or info.get('spec')}` {info.get('commit') or ''}".rstrip())
    return "\n".join(lines) + "\n"


def generated_section(text: str) -> str | None:
    """nlsr-hub's section of a card's text (None if the card has none)."""
    start, stop = text.find(BEGIN), text.find(END)
    return text[start : stop + len(END)] if start != -1 and stop > start else None


def merge_cards(existing: Any, generated: Any) -> Any:
    """`existing` with nlsr-hub's section and YAML keys taken from `generated`; the user's text and every other
    YAML key stay. Tags are united; a card without the section gets it appended."""
    from huggingface_hub import ModelCard

    data = existing.data
    for key, value in vars(generated.data).items():
        if value is None:
            continue
        if key == "tags":
            data.tags = sorted(set(data.tags or []) | set(value))
        elif key != "model_name" or not getattr(data, "model_name", None):
            setattr(data, key, value)
    section = generated_section(generated.text) or ""
    text = existing.text
    old = generated_section(text)
    body = text.replace(old, section) if old else text.rstrip() + "\n\n" + section + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")

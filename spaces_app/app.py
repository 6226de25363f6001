"""nlsr-hub Space: see a fine-tuned model's safety before and after NLSR realignment.

Run locally with ``python spaces_app/app.py`` (http://127.0.0.1:7860). Uses only nlsr-hub's public API;
never passes ``trust_remote_code``; analytics are off; a visitor's token is used for one push and never kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import dataclasses
import functools
import sys
from pathlib import Path

import gradio as gr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backend

from nlsr_hub import NLSRConfig
from nlsr_hub.restorers import RESTORERS
from nlsr_hub.scoring import SCORERS

DEFAULTS = NLSRConfig.preset("default")
HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(NLSRConfig)}


def _guard(fn):
    """Turn the visitor's mistakes into a clear message in the UI instead of a stack trace."""

    @functools.wraps(fn)  # keeps the signature, so gradio still sees the gr.Progress argument
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except backend.SpaceError as err:
            raise gr.Error(str(err)) from None

    return wrapped


@_guard
def run_realign(source, base, aligned, finetuned, scorer, selection, beta, sparsity, prune_ratio, fraction, seed,
                restorer, strength, progress=gr.Progress()):  # noqa: B008 - gradio's progress idiom
    progress(0.05, desc="checking inputs")
    config = backend.make_config(scorer, selection, beta, sparsity, prune_ratio, fraction, seed, restorer, strength)
    progress(0.2, desc="calibration pass and plan")
    session = backend.realign(source, base, aligned, finetuned, config)
    progress(0.9, desc="drawing the plan")
    return (session, backend.heatmap_figure(session.result), backend.summary_markdown(session.result),
            backend.plan_file(session), backend.adapter_zip(session))


@_guard
def run_compare(session, prompt, max_new_tokens):
    return backend.compare(session, prompt, max_new_tokens)


@_guard
def run_evaluate(session, prompts_text, max_new_tokens):
    import pandas as pd

    scores = backend.evaluate(session, prompts_text, max_new_tokens)
    rows = [{"model": which, "metric": metric, "value": value}
            for which, metrics in scores.items() for metric, value in metrics.items()]
    table = "\n".join(f"| {r['model']} | {r['metric']} | {r['value']:.1f} |" for r in rows)
    return pd.DataFrame(rows), "| model | metric | value |\n| --- | --- | --- |\n" + table


@_guard
def run_push(session, repo_id, token, private):
    return backend.push(session, repo_id, token, private)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="nlsr-hub: safety realignment", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("# nlsr-hub — Neuron-Level Safety Realignment\nRestore the safety of a fine-tuned LoRA adapter "
                    "without training: pick the inputs, realign, then compare answers before and after.")
        with gr.Row():
            source = gr.Radio(list(backend.SOURCES), value=backend.TINY_DEMO, label="Inputs", elem_id="source")
        with gr.Row():
            base = gr.Textbox(label="Base model (Hub id or path)", elem_id="base")
            aligned = gr.Textbox(label="Aligned adapter", elem_id="aligned")
            finetuned = gr.Textbox(label="Fine-tuned adapter", elem_id="finetuned")
        with gr.Accordion("Realignment settings", open=False):
            with gr.Row():
                restorer = gr.Dropdown(sorted(RESTORERS), value=DEFAULTS.restorer, label="restorer",
                                       info="; ".join(f"{n}: {r.description}" for n, r in sorted(RESTORERS.items())),
                                       elem_id="restorer")
                strength = gr.Slider(0.0, 3.0, DEFAULTS.strength, step=0.05, label="strength (λ)",
                                     info=HELP["strength"])
            with gr.Row():
                scorer = gr.Dropdown(sorted(SCORERS), value=DEFAULTS.scorer, label="scorer", info=HELP["scorer"])
                selection = gr.Dropdown(["adaptive", "threshold", "fraction"], value=DEFAULTS.selection,
                                        label="selection", info=HELP["selection"])
                seed = gr.Number(DEFAULTS.seed, precision=0, label="seed", info=HELP["seed"])
            with gr.Row():
                beta = gr.Slider(0.0, 3.0, DEFAULTS.beta, step=0.1, label="beta", info=HELP["beta"])
                sparsity = gr.Slider(0.0, 0.99, DEFAULTS.sparsity_ratio, step=0.01, label="sparsity ratio (P_SR)")
                prune_ratio = gr.Slider(0.2, 0.8, DEFAULTS.prune_ratio, step=0.05, label="prune ratio (P_L)")
                fraction = gr.Slider(0.0, 1.0, DEFAULTS.fraction, step=0.05, label="fraction (fraction selection)")
        realign_button = gr.Button("Realign", variant="primary", elem_id="realign")
        with gr.Row():
            heatmap = gr.Plot(label="Similarity per layer and module type", elem_id="heatmap")
            with gr.Column():
                summary = gr.Markdown(elem_id="summary")
                plan_json = gr.File(label="Plan (JSON)")
                adapter_file = gr.File(label="Realigned adapter (zip)")
        gr.Markdown("## Compare answers")
        with gr.Row():
            preset = gr.Dropdown(list(backend.HARMFUL_PRESETS + backend.HARMLESS_PRESETS), label="Preset prompts")
            prompt = gr.Textbox(label="Prompt", max_length=backend.MAX_PROMPT_CHARS, elem_id="prompt")
            tokens = gr.Slider(1, backend.MAX_NEW_TOKENS, 48, step=1, label="new tokens")
        preset.change(lambda p: p, preset, prompt)
        compare_button = gr.Button("Compare", elem_id="compare")
        with gr.Row():
            with gr.Column():
                before = gr.Textbox(label="Fine-tuned answer", elem_id="before")
                before_verdict = gr.Textbox(label="Judge (fine-tuned)", elem_id="before_verdict")
            with gr.Column():
                after = gr.Textbox(label="Realigned answer", elem_id="after")
                after_verdict = gr.Textbox(label="Judge (realigned)", elem_id="after_verdict")
        gr.Markdown("## Evaluate")
        prompt_set = gr.Textbox("\n".join(backend.HARMFUL_PRESETS), lines=6,
                                label=f"Harmful prompts, one per line (at most {backend.MAX_PROMPT_SET})")
        evaluate_button = gr.Button("Evaluate before / after", elem_id="evaluate")
        chart = gr.BarPlot(x="metric", y="value", color="model", label="Harmful score and refusal rate (%)")
        scores = gr.Markdown(elem_id="scores")
        gr.Markdown("## Push to the Hub\nThe token is used for this one upload; it is never logged or stored.")
        with gr.Row():
            repo_id = gr.Textbox(label="Target repo (user/name)")
            token = gr.Textbox(label="Write token", type="password")
            private = gr.Checkbox(label="private", value=True)
        push_button = gr.Button("Push")
        push_status = gr.Markdown()

        realign_button.click(run_realign, [source, base, aligned, finetuned, scorer, selection, beta, sparsity,
                                           prune_ratio, fraction, seed, restorer, strength],
                             [session, heatmap, summary, plan_json, adapter_file], api_name="realign")
        compare_button.click(run_compare, [session, prompt, tokens], [before, before_verdict, after, after_verdict],
                             api_name="compare")
        evaluate_button.click(run_evaluate, [session, prompt_set, tokens], [chart, scores], api_name="evaluate")
        push_button.click(run_push, [session, repo_id, token, private], push_status, api_name="push",
                          show_progress="minimal")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


if __name__ == "__main__":
    build_demo().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), share=False)

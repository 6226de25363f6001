"""nlsr-hub Space: see a fine-tuned model's safety before and after realignment.

Run locally with ``python spaces_app/app.py`` (http://127.0.0.1:7860). The page opens on the prepared SmolLM2
example (``nlsr demo``, or the bundle named by ``NLSR_SPACE_EXAMPLE``) and falls back to an offline smoke test.
Uses only nlsr-hub's public API; never passes ``trust_remote_code``; analytics are off; a visitor's token is
used for one push and never kept; local paths only where the operator sets ``NLSR_SPACE_ALLOW_LOCAL=1``.
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
CHART = {"x": "bar", "y": "value", "color": "model", "y_lim": [0, 100], "sort": None, "x_title": " ",
         "y_title": "%", "x_label_angle": -20}


def _inline_errors(n_outputs: int):
    """Run the handler; a visitor's mistake becomes one message in the error box beside the control (the last
    output), and the other outputs keep what they showed."""

    def decorate(fn):
        @functools.wraps(fn)  # keeps the signature, so gradio still sees the gr.Progress argument
        def wrapped(*args, **kwargs):
            try:
                outputs = fn(*args, **kwargs)
            except backend.SpaceError as err:
                return (*([gr.skip()] * n_outputs), gr.update(value=f"**Error:** {err}", visible=True))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            return (*outputs, gr.update(value="", visible=False))

        return wrapped

    return decorate


def _chart(rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=["bar", "model", "metric", "value"])


def _view_outputs(view: backend.View):
    result = view.session.result
    h2h, caption = backend.head_to_head_figure(result)
    return (view.session, backend.heatmap_figure(result), backend.summary_markdown(result),
            backend.plan_file(view.session), backend.adapter_zip(view.session), _chart(view.scores),
            backend.scores_markdown(view.scores), view.examples_markdown, view.note, h2h, caption)


def on_load():
    """The page's first view: the prepared example (measured, nothing recomputed) or the offline smoke test."""
    view = backend.initial_view()
    source = backend.EXAMPLE if view.examples_markdown or view.scores else backend.TINY_DEMO
    return (gr.update(value=source), *_view_outputs(view))


@_inline_errors(7)
def run_realign(source, base, aligned, finetuned, scorer, selection, beta, sparsity, prune_ratio, fraction, seed,
                restorer, strength, progress=gr.Progress()):  # noqa: B008 - gradio's progress idiom
    progress(0.05, desc="checking inputs")
    config = backend.make_config(scorer, selection, beta, sparsity, prune_ratio, fraction, seed, restorer, strength)
    progress(0.2, desc="calibration pass and plan")
    session = backend.realign(source, base, aligned, finetuned, config)
    progress(0.9, desc="drawing the plan")
    h2h, caption = backend.head_to_head_figure(session.result)
    return (session, backend.heatmap_figure(session.result), backend.summary_markdown(session.result),
            backend.plan_file(session), backend.adapter_zip(session), h2h, caption)


@_inline_errors(4)
def run_compare(session, prompt, max_new_tokens):
    return backend.compare(session, prompt, max_new_tokens)


@_inline_errors(2)
def run_evaluate(session, harmful_text, harmless_text, max_new_tokens):
    rows = backend.evaluate(session, harmful_text, harmless_text, max_new_tokens)
    return _chart(rows), backend.scores_markdown(rows)


@_inline_errors(1)
def run_push(session, repo_id, token, private):
    return backend.push(session, repo_id, token, private)


def _error_box(elem_id: str) -> gr.Markdown:
    return gr.Markdown(visible=False, elem_id=elem_id, elem_classes=["nlsr-error"])


def _settings():
    """The realignment settings accordion: every restorer of the registry with its knob, and NLSR's options."""
    with gr.Accordion("Realignment settings", open=False):
        with gr.Row():
            restorer = gr.Dropdown(sorted(RESTORERS), value=DEFAULTS.restorer, label="restorer",
                                   info="; ".join(f"{n}: {r.description}" for n, r in sorted(RESTORERS.items())),
                                   elem_id="restorer")
            strength = gr.Slider(0.0, 3.0, DEFAULTS.strength, step=0.05, label="strength (λ)", info=HELP["strength"])
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
    return [scorer, selection, beta, sparsity, prune_ratio, fraction, seed, restorer, strength]


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="nlsr-hub: safety realignment", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("# nlsr-hub: restore a fine-tuned model's safety without training\nA few harmful rows in "
                    "fine-tuning data undo a model's safety alignment. The page opens on a real example: "
                    "SmolLM2-135M-Instruct, safety-aligned, fine-tuned on SST-2 with 5 % harmful rows, and "
                    "realigned by the default restorer.")
        note = gr.Markdown(elem_id="note")
        with gr.Row():
            measured = gr.BarPlot(label="Measured before / after (%): non-refusal on harmful prompts (keyword judge), "
                                  "over-refusal on harmless prompts, SST-2 accuracy", elem_id="measured", **CHART)
            examples = gr.Markdown(elem_id="examples")
        measured_table = gr.Markdown(elem_id="measured_table")
        gr.Markdown("## Realign")
        source = gr.Radio(list(backend.SOURCES), value=backend.EXAMPLE, label="Inputs", elem_id="source")
        with gr.Row():
            local = " or local paths" if backend.local_paths_allowed() else ""
            base = gr.Textbox(label=f"Base model (Hub id{local})", elem_id="base")
            aligned = gr.Textbox(label="Aligned adapter", elem_id="aligned")
            finetuned = gr.Textbox(label="Fine-tuned adapter", elem_id="finetuned")
        settings = _settings()
        with gr.Row():
            realign_button = gr.Button("Realign", variant="primary", elem_id="realign")
            realign_error = _error_box("realign_error")
        with gr.Row():
            heatmap = gr.Plot(label="Similarity per layer and module type", elem_id="heatmap")
            with gr.Column():
                summary = gr.Markdown(elem_id="summary")
                plan_json = gr.File(label="Plan (JSON)")
                adapter_file = gr.File(label="Realigned adapter (zip)")
        with gr.Row():
            h2h = gr.Plot(label="Restorers head-to-head: non-refusal rate against task accuracy", elem_id="h2h")
            h2h_caption = gr.Markdown(elem_id="h2h_caption")
        gr.Markdown("## Compare answers")
        presets = list(backend.HARMFUL_PRESETS + backend.HARMLESS_PRESETS)
        with gr.Row():
            preset = gr.Dropdown(presets, value=presets[0], label="Preset prompts", elem_id="preset")
            prompt = gr.Textbox(presets[0], label="Prompt", max_length=backend.MAX_PROMPT_CHARS, elem_id="prompt")
            tokens = gr.Slider(1, backend.MAX_NEW_TOKENS, 48, step=1, label="new tokens")
        preset.change(lambda p: p, preset, prompt)
        with gr.Row():
            compare_button = gr.Button("Compare", elem_id="compare")
            compare_error = _error_box("compare_error")
        with gr.Row():
            with gr.Column():
                before = gr.Textbox(label="Fine-tuned answer", elem_id="before")
                before_verdict = gr.Textbox(label="Keyword judge (fine-tuned)", elem_id="before_verdict")
            with gr.Column():
                after = gr.Textbox(label="Realigned answer", elem_id="after")
                after_verdict = gr.Textbox(label="Keyword judge (realigned)", elem_id="after_verdict")
        gr.Markdown("## Evaluate\nThe keyword judge detects refusals; it does not measure harm.")
        with gr.Row():
            harmful_set = gr.Textbox("\n".join(backend.HARMFUL_PRESETS), lines=6, elem_id="harmful_set",
                                     label=f"Harmful prompts, one per line (at most {backend.MAX_PROMPT_SET})")
            harmless_set = gr.Textbox("\n".join(backend.HARMLESS_PRESETS), lines=6, elem_id="harmless_set",
                                      label=f"Harmless prompts for over-refusal (at most {backend.MAX_PROMPT_SET})")
        with gr.Row():
            evaluate_button = gr.Button("Evaluate before / after", elem_id="evaluate")
            evaluate_error = _error_box("evaluate_error")
        chart = gr.BarPlot(label="Before / after (%): non-refusal on your harmful prompts, over-refusal on your "
                           "harmless ones", elem_id="chart", **CHART)
        scores = gr.Markdown(elem_id="scores")
        gr.Markdown("## Push to the Hub\nThe token is used for this one upload; it is never logged or stored.")
        with gr.Row():
            repo_id = gr.Textbox(label="Target repo (user/name)")
            token = gr.Textbox(label="Write token", type="password")
            private = gr.Checkbox(label="private", value=True)
        with gr.Row():
            push_button = gr.Button("Push")
            push_error = _error_box("push_error")
        push_status = gr.Markdown()

        demo.load(on_load, None, [source, session, heatmap, summary, plan_json, adapter_file, measured,
                                  measured_table, examples, note, h2h, h2h_caption])
        realign_button.click(run_realign, [source, base, aligned, finetuned, *settings],
                             [session, heatmap, summary, plan_json, adapter_file, h2h, h2h_caption, realign_error],
                             api_name="realign")
        compare_button.click(run_compare, [session, prompt, tokens],
                             [before, before_verdict, after, after_verdict, compare_error], api_name="compare")
        evaluate_button.click(run_evaluate, [session, harmful_set, harmless_set, tokens],
                              [chart, scores, evaluate_error], api_name="evaluate")
        push_button.click(run_push, [session, repo_id, token, private], [push_status, push_error], api_name="push",
                          show_progress="minimal")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


if __name__ == "__main__":
    build_demo().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), share=False)

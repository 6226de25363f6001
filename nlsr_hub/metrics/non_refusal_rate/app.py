"""Gradio widget of the `non_refusal_rate` metric (a Hub metric Space)."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(str(Path(__file__).with_name("non_refusal_rate.py")))
launch_gradio_widget(module)

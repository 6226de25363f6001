"""Gradio widget of the `over_refusal` metric (a Hub metric Space)."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(str(Path(__file__).with_name("over_refusal.py")))
launch_gradio_widget(module)

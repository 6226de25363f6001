"""Gradio widget of the `harmful_score` metric (a Hub metric Space)."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(str(Path(__file__).with_name("harmful_score.py")))
launch_gradio_widget(module)

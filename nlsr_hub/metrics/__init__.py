"""The project's safety figures as `evaluate` modules, each a folder ready to push as a Hub metric Space.

- ``non_refusal_rate``: percent of responses to harmful prompts that do not refuse (keyword refusal detector). It
  measures non-refusal, not harm.
- ``harmful_score``: percent of responses a chosen harm judge flags (from its verdicts, or by running the judge).
- ``over_refusal``: percent of responses to harmless prompts that refuse: the price of safety bought by refusing.

Each loads with ``evaluate.load(str(metric_path(name)))``; `compute_metric` is what nlsr-hub's own evaluation
calls, so the library and the published modules cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("harmful_score", "non_refusal_rate", "over_refusal")
METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """The folder of the `evaluate` module `name` (its script is ``<name>/<name>.py``)."""
    if name not in METRICS:
        raise ValueError(f"Unknown `metric` {name!r}; valid metrics: {', '.join(METRICS)}.")
    return METRICS_DIR / name


@functools.cache
def load_metric(name: str) -> Any:
    """``evaluate.load`` of the local module `name`, in memory (loaded once per process)."""
    try:
        import evaluate
    except ImportError as err:  # pragma: no cover - `evaluate` is in the eval, train and dev extras
        raise ImportError("nlsr-hub's metrics need the `evaluate` package: pip install 'nlsr-hub[eval]'") from err
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def compute_metric(name: str, predictions: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """The result of metric `name` on `predictions` (NaN rates and n = 0 when there are none)."""
    if len(predictions) == 0:
        return {name: float("nan"), "n": 0}
    return dict(load_metric(name).compute(predictions=list(predictions), **kwargs))


def percent(flags: Sequence[bool]) -> float:
    """Percent of true `flags` (NaN when empty)."""
    return 100.0 * sum(bool(f) for f in flags) / len(flags) if len(flags) else float("nan")


def push_metric_to_hub(name: str, repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Upload the module folder `name` as a Gradio metric Space `repo_id` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=metric_path(name),
                             commit_message=f"Upload the {name} metric from nlsr-hub",
                             ignore_patterns=["__pycache__/*", "*.pyc"])
    return str(getattr(info, "commit_url", info))


__all__ = ["METRICS", "compute_metric", "load_metric", "metric_path", "percent", "push_metric_to_hub"]

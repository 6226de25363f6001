"""The experiments wing (needs the ``train`` extra): the paper's grid, the README demo and the restorers'
head-to-head on SmolLM2-135M-Instruct, composed from cached stage functions (`stages`).

Front doors (the CLI and the Space use these, never the cache layout):

- `run_grid(settings, out=...)`: align -> attack -> realign -> evaluate, with a report;
- `run_demo(out=...)`: the README demo; `demo_inputs()`: the models it prepared;
- `run_head_to_head(settings, out=...)`: every restorer swept over its knob on fixed adapters;
  `head_to_head_figure(results, restorer=..., config=...)`: its plot with one setting marked;
- `stage_log(path)`: the stage log of a run to stderr and a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data import DataMissing
from .logs import stage_log

if TYPE_CHECKING:
    from .demo import DemoInputs

__all__ = ["DataMissing", "demo_inputs", "head_to_head_figure", "run_demo", "run_grid", "run_head_to_head",
           "stage_log"]


def run_grid(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `nlsr_hub.experiments.grid.run_grid`."""
    from .grid import run_grid as run

    return run(*args, **kwargs)


def run_demo(**kwargs: Any) -> tuple[dict[str, Any], str]:
    """See `nlsr_hub.experiments.demo.run_demo`."""
    from .demo import run_demo as run

    return run(**kwargs)


def demo_inputs(cache: Any = None, *, bundle: Any = None) -> DemoInputs:
    """See `nlsr_hub.experiments.demo.demo_inputs`."""
    from .demo import demo_inputs as inputs

    return inputs(cache, bundle=bundle)


def head_to_head_figure(results: dict[str, Any], *, method: str = "sft", restorer: str | None = None,
                        config: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """The head-to-head's plot for `method`'s pair (a matplotlib Figure, or None) with the measured point of
    `restorer` + `config` marked, and that point's row (None when that setting was not measured)."""
    from .restorers_report import find_point, pareto_figure

    mark = find_point(results, method, restorer, config or {}) if restorer else None
    return pareto_figure(results, method, mark=mark), mark


def run_head_to_head(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `nlsr_hub.experiments.headtohead.run_head_to_head`."""
    from .headtohead import run_head_to_head as run

    return run(*args, **kwargs)

"""Which modules to restore (SPEC step 4): pure functions of the per-module similarities.

- ``adaptive``: rank modules by similarity, ``n_j ∈ [0, 1]`` (1 = most similar),
  ``P_j = P_L − ε + 2ε·n_j``, ``γ_j ~ Bernoulli(P_j)`` from a seeded generator; patch when ``γ_j = 0``
  (``compat``: when ``γ_j = 1``, as the published code does).
- ``threshold``: patch iff ``S_j < τ``. ``fraction``: patch the k least similar. ``blocks``: patch every
  module of the given blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .adapters import layer_index
from .config import NLSRConfig, parse_block_ranges
from .masks import round_half_up


@dataclass(frozen=True)
class Selection:
    """The decision for one module: patched or not, and for adaptive selection its probability and draw."""

    patched: bool
    order: int  # position when sorted by similarity, 0 = least similar
    keep_probability: float | None = None
    draw: int | None = None


def similarity_order(similarities: Mapping[str, float]) -> list[str]:
    """Module names from least to most similar; ties broken by name, so the order is deterministic."""
    return sorted(similarities, key=lambda name: (similarities[name], name))


def select_modules(similarities: Mapping[str, float], config: NLSRConfig) -> dict[str, Selection]:
    """Decide, for every module, whether it is patched (see the module docstring)."""
    if not similarities:
        raise ValueError("No module to select from: the adapters share no LoRA module.")
    order = similarity_order(similarities)
    position = {name: i for i, name in enumerate(order)}
    n = len(order)
    if config.selection == "adaptive":
        names = sorted(similarities)
        uniforms = torch.rand(n, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
        result = {}
        for name, u in zip(names, uniforms.tolist(), strict=True):
            normalised = position[name] / (n - 1) if n > 1 else 0.5
            p_keep = config.prune_ratio - config.epsilon + 2.0 * config.epsilon * normalised
            draw = int(u < p_keep)
            patched = draw == 1 if config.compat else draw == 0
            result[name] = Selection(patched, position[name], p_keep, draw)
        return result
    if config.selection == "threshold":
        return {name: Selection(similarities[name] < config.threshold, position[name]) for name in order}
    if config.selection == "fraction":
        k = round_half_up(config.fraction * n)
        return {name: Selection(position[name] < k, position[name]) for name in order}
    if config.selection == "blocks":
        blocks = set(parse_block_ranges(config.blocks or ""))
        return {name: Selection(layer_index(name) in blocks, position[name]) for name in order}
    raise ValueError(f"Unknown `selection` {config.selection!r}.")

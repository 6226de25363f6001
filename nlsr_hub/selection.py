"""Which modules to restore (SPEC step 4): pure functions of the per-module similarities.

- ``adaptive``: rank modules by similarity, ``n_j ∈ [0, 1]`` (1 = most similar),
  ``P_j = P_L − ε + 2ε·n_j``, ``γ_j ~ Bernoulli(P_j)`` from a seeded generator; patch when ``γ_j = 0``
  (``compat``: when ``γ_j = 1``, as the published code does). How the γ_j are drawn is a draw order (`DRAWS`):
  ``sorted_names`` (one uniform stream over the sorted names) or ``layer_major`` (the published code's
  ``torch.bernoulli`` per module, block by block in q, k, v, o, gate, up, down order).
- ``threshold``: patch iff ``S_j < τ``. ``fraction``: patch the k least similar. ``blocks``: patch every
  module of the given blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .adapters import block_order, layer_index, module_type
from .config import NLSRConfig, parse_block_ranges
from .masks import round_half_up
from .registry import Registry

# the order in which the published code visits a block's LoRA modules; other module types follow, by name
PUBLISHED_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DrawFn = Callable[[Mapping[str, float], int], dict[str, int]]
DRAWS: Registry[DrawFn] = Registry("draw_order")


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


def layer_major_order(names: list[str] | tuple[str, ...] | Mapping[str, object]) -> list[str]:
    """Module names block by block (numerically; modules outside the blocks last), inside a block in
    `PUBLISHED_MODULE_ORDER` and then any other module type by name."""
    rank = {kind: i for i, kind in enumerate(PUBLISHED_MODULE_ORDER)}

    def key(name: str) -> tuple[tuple[bool, int], int, str]:
        return block_order(layer_index(name)), rank.get(module_type(name), len(rank)), name

    return sorted(names, key=key)


def draws_sorted_names(keep_probabilities: Mapping[str, float], seed: int) -> dict[str, int]:
    """γ_j = [u_j < P_j] with u one float64 uniform stream of a CPU generator seeded with `seed`, consumed in
    sorted-name order (the project's default)."""
    names = sorted(keep_probabilities)
    uniforms = torch.rand(len(names), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {name: int(u < keep_probabilities[name]) for name, u in zip(names, uniforms.tolist(), strict=True)}


def draws_layer_major(keep_probabilities: Mapping[str, float], seed: int) -> dict[str, int]:
    """The published code's draws: a generator seeded with `seed` (as ``torch.manual_seed`` seeds the default
    one), then ``torch.bernoulli(P_j)`` on a float32 scalar, one module at a time in `layer_major_order`.
    Drawn on CPU; the published runs drew on a GPU, whose random stream differs."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name in layer_major_order(keep_probabilities):
        probability = torch.tensor(keep_probabilities[name], dtype=torch.float32)
        result[name] = int(torch.bernoulli(probability, generator=generator).item())
    return result


DRAWS["sorted_names"] = draws_sorted_names
DRAWS["layer_major"] = draws_layer_major


def keep_probability(position: int, n: int, config: NLSRConfig) -> float:
    """``P_j = P_L − ε + 2ε·n_j`` with ``n_j = position / (n − 1)`` (0.5 for a single module)."""
    normalised = position / (n - 1) if n > 1 else 0.5
    return config.prune_ratio - config.epsilon + 2.0 * config.epsilon * normalised


def select_modules(similarities: Mapping[str, float], config: NLSRConfig) -> dict[str, Selection]:
    """Decide, for every module, whether it is patched (see the module docstring)."""
    if not similarities:
        raise ValueError("No module to select from: the adapters share no LoRA module.")
    order = similarity_order(similarities)
    position = {name: i for i, name in enumerate(order)}
    n = len(order)
    if config.selection == "adaptive":
        keep = {name: keep_probability(position[name], n, config) for name in order}
        draws = DRAWS.lookup(config.effective_draw_order)(keep, config.seed)
        return {name: Selection(draws[name] == 1 if config.compat else draws[name] == 0, position[name], keep[name],
                                draws[name]) for name in sorted(similarities)}
    if config.selection == "threshold":
        return {name: Selection(similarities[name] < config.threshold, position[name]) for name in order}
    if config.selection == "fraction":
        k = round_half_up(config.fraction * n)
        return {name: Selection(position[name] < k, position[name]) for name in order}
    if config.selection == "blocks":
        blocks = set(parse_block_ranges(config.blocks or ""))
        return {name: Selection(layer_index(name) in blocks, position[name]) for name in order}
    raise ValueError(f"Unknown `selection` {config.selection!r}.")

"""Planted damage: the trio's three damaged modules are the ones every selection method singles out.

The scoring pass runs once (the session's default run); each test re-plans from the same similarities.
"""

from __future__ import annotations

from collections import Counter

import pytest

from nlsr_hub import NLSRConfig
from nlsr_hub.adapters import layer_index
from nlsr_hub.patch import neuron_counts, similarities
from nlsr_hub.plan import plan_realignment

MANY_SEEDS = 20_000  # the two least-separated modules differ by 0.03 in P(patch): ~6 sigma at this count


@pytest.fixture(scope="module")
def scored(default_run):
    patcher, result = default_run
    return similarities(result.safety_patch, patcher.finetuned), neuron_counts(result.safety_patch)


def replan(scored, **config):
    sims, counts = scored
    return plan_realignment(sims, counts, NLSRConfig(**config))


def patch_rates(scored, seeds: range, **config) -> dict[str, float]:
    counter: Counter[str] = Counter()
    for seed in seeds:
        counter.update(replan(scored, seed=seed, **config).patched)
    return {name: counter[name] / len(seeds) for name in scored[0]}


def test_damaged_modules_are_the_least_similar(scored, trio):
    sims, _ = scored
    assert len(sims) == 14
    ranked = sorted(sims, key=sims.get)
    assert set(ranked[:3]) == set(trio.damaged)
    assert max(sims[n] for n in trio.damaged) < 0.5 < min(sims[n] for n in sims if n not in trio.damaged)


def test_threshold_selection_patches_exactly_the_damaged_modules(scored, trio):
    plan = replan(scored, selection="threshold", threshold=0.5)
    assert sorted(plan.patched) == sorted(trio.damaged)
    assert all(m.keep_probability is None and m.draw is None for m in plan.modules)
    assert replan(scored, selection="threshold", threshold=-1.0).num_patched == 0
    assert replan(scored, selection="threshold", threshold=1.0).num_patched == 14


def test_fraction_selection_patches_exactly_the_damaged_modules(scored, trio):
    plan = replan(scored, selection="fraction", fraction=3 / 14)
    assert sorted(plan.patched) == sorted(trio.damaged)
    assert replan(scored, selection="fraction", fraction=0.0).num_patched == 0
    assert replan(scored, selection="fraction", fraction=1.0).num_patched == 14


@pytest.mark.parametrize(("blocks", "expected"), [("1", {1}), ("0", {0}), ("0-1", {0, 1}), ("1,0", {0, 1})])
def test_block_selection_patches_exactly_those_blocks(scored, blocks, expected):
    plan = replan(scored, selection="blocks", blocks=blocks)
    assert set(plan.patched) == {n for n in scored[0] if layer_index(n) in expected}
    assert {m.block for m in plan.modules if m.patched} == expected


def test_plan_records_similarity_order_probability_and_draw(scored):
    sims, counts = scored
    config = NLSRConfig()
    plan = replan(scored)
    n = len(sims)
    for m in plan.modules:
        assert m.similarity == sims[m.name]
        assert m.order == sorted(sims, key=sims.get).index(m.name)
        assert m.keep_probability == pytest.approx(
            config.prune_ratio - config.epsilon + 2 * config.epsilon * m.order / (n - 1))
        assert m.draw in (0, 1)
        assert m.patched == (m.draw == 0)  # paper: patch when gamma = 0
        assert m.neurons_restored == (counts[m.name][0] if m.patched else 0)
        assert m.neurons_total == counts[m.name][1]
    assert plan == replan(scored)  # seeded


def test_adaptive_patches_damaged_modules_most_often(scored, trio):
    undamaged = [n for n in scored[0] if n not in trio.damaged]
    # 50 seeds: on average, damaged modules are patched far more often than undamaged ones
    rates = patch_rates(scored, range(50))
    damaged_mean = sum(rates[n] for n in trio.damaged) / 3
    undamaged_mean = sum(rates[n] for n in undamaged) / len(undamaged)
    assert damaged_mean > undamaged_mean + 0.15
    # many seeds: every damaged module is patched more often than any undamaged one, at P(patch) = 1 - P_j
    rates = patch_rates(scored, range(MANY_SEEDS))
    assert min(rates[n] for n in trio.damaged) > max(rates[n] for n in undamaged)
    plan = replan(scored)
    for m in plan.modules:
        assert rates[m.name] == pytest.approx(1 - m.keep_probability, abs=0.02)
    assert rates[sorted(scored[0], key=scored[0].get)[0]] == pytest.approx(0.7, abs=0.02)


def test_compat_selection_inverts_the_draw(scored, trio):
    undamaged = [n for n in scored[0] if n not in trio.damaged]
    rates = patch_rates(scored, range(MANY_SEEDS), compat=True)
    assert max(rates[n] for n in trio.damaged) < min(rates[n] for n in undamaged)
    for seed in (0, 1, 2):  # compat draws in the published order (tests/test_compat.py pins that order)
        paper, compat = replan(scored, seed=seed, draw_order="layer_major"), replan(scored, seed=seed, compat=True)
        for a, b in zip(paper.modules, compat.modules, strict=True):
            assert a.draw == b.draw and a.patched != b.patched  # same draws, opposite decision


def test_adaptive_expected_patched_count(scored):
    n = len(scored[0])
    config = NLSRConfig()
    plan = replan(scored)
    assert sum(1 - m.keep_probability for m in plan.modules) == pytest.approx((1 - config.prune_ratio) * n)
    counts = [replan(scored, seed=seed).num_patched for seed in range(2000)]
    assert sum(counts) / len(counts) == pytest.approx((1 - config.prune_ratio) * n, abs=0.15)
    counts = [replan(scored, seed=seed, prune_ratio=0.8, epsilon=0.1).num_patched for seed in range(2000)]
    assert sum(counts) / len(counts) == pytest.approx(0.2 * n, abs=0.15)

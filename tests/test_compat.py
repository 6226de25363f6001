"""`compat=True` is the published code's recipe, and each of its parts is reachable on its own (issue #21).

Every expected value below is computed by hand from the published definitions, not by calling the code under
test: the mask keeps the scores strictly above the one at ascending sorted position int(N·P_SR); the draws are
torch.manual_seed(seed) then one torch.bernoulli(P_j) per module, block by block in q, k, v, o, gate, up, down
order; the swap copies B_e without rescaling.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nlsr_hub import LoraAdapter, NLSRConfig, NLSRPatcher
from nlsr_hub.adapters import LoraModule
from nlsr_hub.card import render_card
from nlsr_hub.config import DRAW_ORDERS, MASK_RULE_CHOICES
from nlsr_hub.masks import MASK_RULES, ModuleMask, mask_from_scores, strict_threshold_mask, top_k_mask
from nlsr_hub.patch import apply_plan, swap_factors
from nlsr_hub.plan import RealignmentPlan, plan_realignment
from nlsr_hub.safety_patch import SafetyPatch, build_safety_patch
from nlsr_hub.scoring import ModuleStats
from nlsr_hub.selection import DRAWS, draws_layer_major, layer_major_order, select_modules

PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
# the published visiting order, written out: block 0's q..down, then block 1's, ..., block 11's (10 after 9)
HAND_ORDER = [f"model.layers.{block}.{part}" for block in range(12) for part in PARTS]
PUBLISHED = {"scorer": "low_rank_sequential", "mask_rule": "strict_threshold", "draw_order": "layer_major",
             "swap_scaling": "unscaled"}
PAPER = {"scorer": "low_rank", "mask_rule": "top_k", "draw_order": "sorted_names", "swap_scaling": "rescaled"}


def distinct_scores(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))
    return order.to(torch.float64).reshape(shape)


# ------------------------------------------------------------------------------------- config


def test_compat_implies_every_published_part_and_auto_follows_it():
    assert recipe_of(NLSRConfig(compat=True)) == PUBLISHED
    assert recipe_of(NLSRConfig()) == PAPER
    assert NLSRConfig(compat=True, scorer="wanda").effective_scorer == "wanda"  # only low_rank has a sequential twin


@pytest.mark.parametrize(("field", "value"), [("mask_rule", "strict_threshold"), ("draw_order", "layer_major"),
                                             ("swap_scaling", "unscaled"), ("scorer", "low_rank_sequential")])
def test_each_published_part_is_reachable_on_its_own(field, value):
    config = NLSRConfig(**{field: value})
    assert not config.compat
    assert recipe_of(config) == {**PAPER, field: value}


@pytest.mark.parametrize(("field", "value"), [("mask_rule", "top_k"), ("draw_order", "sorted_names"),
                                             ("swap_scaling", "rescaled")])
def test_compat_with_one_part_set_back_to_the_papers(field, value):
    assert recipe_of(NLSRConfig(compat=True, **{field: value})) == {**PUBLISHED, field: value}


@pytest.mark.parametrize("field", ["mask_rule", "draw_order", "swap_scaling"])
def test_unknown_part_names_the_field_and_its_values(field):
    with pytest.raises(ValueError, match=rf"Unknown `{field}` 'nope'; valid values: auto, "):
        NLSRConfig(**{field: "nope"})


def test_cache_key_keeps_results_cached_before_the_recipe_fields_existed():
    # the realign stage key of a cached head-to-head point, written before mask_rule/draw_order/swap_scaling
    before = {"restorer": "nlsr-addback", "granularity": "row", "selection": "fraction", "fraction": 1.0,
              "strength": 1.0}
    key = NLSRConfig(**before).cache_key()
    assert not {"mask_rule", "draw_order", "swap_scaling"} & set(key)
    assert set(NLSRConfig().to_dict()) - set(key) == {"mask_rule", "draw_order", "swap_scaling"}
    assert {k: key[k] for k in before} == before
    for field, value in [("mask_rule", "top_k"), ("draw_order", "layer_major"), ("swap_scaling", "rescaled")]:
        changed = NLSRConfig(**before, **{field: value}).cache_key()
        assert changed[field] == value and changed != key


def test_config_choices_are_the_registries():
    assert set(MASK_RULE_CHOICES) == {"auto", *MASK_RULES}
    assert set(DRAW_ORDERS) == {"auto", *DRAWS}


def recipe_of(config: NLSRConfig) -> dict[str, str]:
    return {"scorer": config.effective_scorer, "mask_rule": config.effective_mask_rule,
            "draw_order": config.effective_draw_order, "swap_scaling": config.effective_swap_scaling}


# ------------------------------------------------------------------------------------- mask rule


@pytest.mark.parametrize(
    ("shape", "sparsity", "published", "paper"),
    [
        ((10,), 0.8, 1, 2),  # (1-P)·N = 2, fractional part 0: int(8.0) = 8 -> 10 - 8 - 1 = 1 kept
        ((4, 5), 0.8, 3, 4),  # 20 entries: int(16.0) = 16 -> 3 kept, against 4
        ((5,), 0.5, 2, 3),  # (1-P)·N = 2.5, fractional part 0.5: int(2.5) = 2 -> 2 kept, against round(2.5) = 3
        ((7,), 0.8, 1, 1),  # (1-P)·N = 1.4, fractional part 0.4 < 0.5: int(5.6) = 5 -> 1 kept, the same
        ((128, 4096), 0.8, 104_857, 104_858),  # the factor: int(419430.4) = 419430 -> 104857 kept
    ],
)
def test_strict_threshold_counts_at_the_boundary_cases(shape, sparsity, published, paper):
    scores = distinct_scores(shape)
    mask = strict_threshold_mask(scores, sparsity)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == published
    assert int(top_k_mask(scores, sparsity).sum()) == paper
    # with distinct scores the kept entries are exactly the `published` largest ones
    assert torch.equal(mask.reshape(-1), scores.reshape(-1) >= scores.numel() - published)


def test_strict_threshold_truncates_pythons_float_product():
    assert 100 * 0.57 < 57  # 56.99999999999999, so int() gives 56 and 100 - 56 - 1 = 43 entries stay
    assert int(strict_threshold_mask(distinct_scores((100,)), 0.57).sum()) == 43


@pytest.mark.parametrize(
    ("scores", "sparsity", "published", "paper"),
    [
        # ascending [1, 2, 3, 3, 3, 4], position int(3.0) = 3 holds 3: every 3 is dropped, only the 4 stays
        ([1, 2, 3, 3, 3, 4], 0.5, [0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 0, 1]),
        # ascending [1, 2, 3, 4, 5, 5], position 3 holds 4: both 5s (tied above the threshold) stay
        ([5, 5, 1, 2, 3, 4], 0.5, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1]),
        # all tied: nothing is strictly above, so nothing stays (top_k keeps round(1.6) = 2, the first two)
        ([2, 2, 2, 2, 2, 2, 2, 2], 0.8, [0] * 8, [1, 1, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_strict_threshold_drops_every_tie_with_the_threshold(scores, sparsity, published, paper):
    values = torch.tensor(scores, dtype=torch.float64)
    assert strict_threshold_mask(values, sparsity).tolist() == [bool(v) for v in published]
    assert top_k_mask(values, sparsity).tolist() == [bool(v) for v in paper]


def test_strict_threshold_compares_in_the_factors_dtype():
    """A bf16 factor: scores that differ in float64 (1, 1.001, 1.003) are all 1.0 in bf16, so they tie with the
    threshold and are dropped, as in the published code, which scores the factor as stored."""
    name = "model.layers.0.self_attn.q_proj"
    module = LoraModule(torch.tensor([[1.0, 1.0, 1.0, 0.5]], dtype=torch.bfloat16),
                        torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.bfloat16), 1.0)
    # wanda with unit Gram: score_A = |A| · ‖x‖ = [1, 1.001, 1.003, 0.5], score_B = |B|
    stats = {name: ModuleStats(tokens=1, gram=torch.eye(1, dtype=torch.float64),
                               input_sq=torch.tensor([1.0, 1.001**2, 1.003**2, 1.0], dtype=torch.float64))}
    reference = LoraAdapter(modules={name: module}, config={"r": 1, "lora_alpha": 1})
    published = build_safety_patch(reference, stats, scorer="wanda", sparsity_ratio=0.5,
                                   mask_rule="strict_threshold").masks[name]
    # bf16 scores [1, 1, 1, 0.5]: position int(2.0) = 2 of [0.5, 1, 1, 1] holds 1, nothing is above it
    assert published.A.tolist() == [[False, False, False, False]]
    assert published.B.tolist() == [[False], [False], [True]]  # |B| = [1, 2, 3]: position int(1.5) = 1 holds 2
    paper = build_safety_patch(reference, stats, scorer="wanda", sparsity_ratio=0.5).masks[name]
    assert paper.A.tolist() == [[False, True, True, False]]  # round(2.0) = 2 largest float64 scores


def test_row_granularity_applies_the_rule_to_row_scores():
    score_B = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.5, 0.5], [4.0, 4.0], [2.0, 0.0]], dtype=torch.float64)
    # row sums [2, 3, 1, 8, 2]; ascending [1, 2, 2, 3, 8], position int(2.5) = 2 holds 2 -> rows 1 and 3 stay
    mask = mask_from_scores(torch.zeros(2, 3), score_B, 0.5, "row", "strict_threshold")
    assert mask.A is None and mask.B.reshape(-1).tolist() == [False, True, False, True, False]


# ------------------------------------------------------------------------------------- draw order


def test_layer_major_order_is_block_by_block_in_published_module_order():
    shuffled = sorted(HAND_ORDER)  # lexicographic: layers.0, layers.1, layers.10, ...; mlp before self_attn
    assert shuffled != HAND_ORDER
    assert layer_major_order(shuffled) == HAND_ORDER
    assert layer_major_order(["lm_head", "model.layers.0.mlp.w9", "model.layers.0.mlp.down_proj"]) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.w9", "lm_head"]  # unknown types after, blocks first


def published_draws(keep: dict[str, float], seed: int) -> dict[str, int]:
    """The published definition, literally: seed the global generator, then one bernoulli per module in order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: int(torch.bernoulli(torch.tensor(keep[name]))) for name in HAND_ORDER}


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_layer_major_draws_equal_the_published_definition(seed):
    keep = {name: 0.3 + 0.4 * i / (len(HAND_ORDER) - 1) for i, name in enumerate(reversed(HAND_ORDER))}
    assert draws_layer_major(keep, seed) == published_draws(keep, seed)


def test_compat_selection_draws_in_published_order_and_patches_on_one():
    sims = {name: 0.5 + 0.004 * ((i * 37) % 84) for i, name in enumerate(HAND_ORDER)}  # distinct similarities
    ranked = sorted(sims, key=sims.get)
    keep = {name: 0.3 + 0.4 * ranked.index(name) / 83 for name in sims}  # P_j = P_L - ε + 2ε·n_j by hand
    expected = published_draws(keep, 42)
    compat = select_modules(sims, NLSRConfig(compat=True))
    alone = select_modules(sims, NLSRConfig(draw_order="layer_major"))
    default = select_modules(sims, NLSRConfig())
    uniforms = torch.rand(84, generator=torch.Generator().manual_seed(42), dtype=torch.float64).tolist()
    sorted_draws = {name: int(u < keep[name]) for name, u in zip(sorted(sims), uniforms, strict=True)}
    for name in sims:
        assert compat[name].keep_probability == pytest.approx(keep[name])
        assert compat[name].draw == alone[name].draw == expected[name]
        assert compat[name].patched == (expected[name] == 1) and alone[name].patched == (expected[name] == 0)
        assert default[name].draw == sorted_draws[name] and default[name].patched == (sorted_draws[name] == 0)
    assert sum(compat[n].draw != default[n].draw for n in sims) > 0


# ------------------------------------------------------------------------------------- swap scaling


def swap_inputs():
    g = torch.Generator().manual_seed(3)
    reference = LoraModule(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 2.0)
    finetuned = LoraModule(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 0.5)
    mask = ModuleMask(A=torch.rand(2, 5, generator=g) > 0.5, B=torch.rand(4, 2, generator=g) > 0.5)
    return reference, finetuned, mask


def test_unscaled_swap_copies_B_e_and_rescaled_multiplies_it_by_the_scale_ratio():
    reference, finetuned, mask = swap_inputs()
    unscaled = swap_factors(reference, finetuned, mask, rescale=False)
    rescaled = swap_factors(reference, finetuned, mask)
    assert torch.equal(unscaled.A, torch.where(mask.A, reference.A, finetuned.A)) and unscaled.scale == 0.5
    assert torch.equal(unscaled.B, torch.where(mask.B, reference.B, finetuned.B))
    assert torch.equal(rescaled.B, torch.where(mask.B, reference.B * 4.0, finetuned.B))  # s_e / s_t = 4


def test_apply_plan_swaps_with_the_plans_recorded_scaling_and_old_plans_rescale():
    reference, finetuned, mask = swap_inputs()
    name = "model.layers.0.self_attn.q_proj"
    patch = SafetyPatch(reference=LoraAdapter({name: reference}, {}), masks={name: mask})
    target = LoraAdapter({name: finetuned}, {})
    config = NLSRConfig(compat=True, selection="threshold", threshold=1.0)
    plan = plan_realignment({name: 0.2}, {name: (mask.count(), mask.total())}, config)
    assert plan.recipe["swap_scaling"] == "unscaled" and plan.patched == [name]
    assert torch.equal(apply_plan(target, patch, plan)[name].B, torch.where(mask.B, reference.B, finetuned.B))
    old = dataclasses.replace(plan, recipe={})  # a compat plan written before the recipe was recorded
    assert torch.equal(apply_plan(target, patch, old)[name].B, torch.where(mask.B, reference.B * 4.0, finetuned.B))


# ------------------------------------------------------------------------------------- the plan records the recipe


def test_plan_records_the_recipe_and_round_trips():
    sims = {name: 0.05 * i for i, name in enumerate(HAND_ORDER[:14])}
    counts = {name: (3, 10) for name in sims}
    for config, recipe in ((NLSRConfig(compat=True), PUBLISHED), (NLSRConfig(), PAPER)):
        plan = plan_realignment(sims, counts, config)
        assert dict(plan.recipe) == recipe and plan.scorer == recipe["scorer"]
        assert json.loads(plan.to_json())["recipe"] == recipe
        assert RealignmentPlan.from_json(plan.to_json()) == plan
        assert f"mask_rule={recipe['mask_rule']}" in plan.table()
        assert f"(draw_order={recipe['draw_order']})" in plan.table()


def test_a_plan_written_before_the_recipe_reads_as_what_ran_then():
    sims = {name: 0.1 * i for i, name in enumerate(HAND_ORDER[:7])}
    data = json.loads(plan_realignment(sims, {n: (3, 10) for n in sims}, NLSRConfig(compat=True)).to_json())
    del data["recipe"]
    for field in ("mask_rule", "draw_order", "swap_scaling"):
        del data["config"][field]
    old = RealignmentPlan.from_dict(data)
    assert old.recipe == {}
    assert {key: old.recipe_value(key) for key in PAPER} == {**PAPER, "scorer": "low_rank"}


@pytest.mark.parametrize(("recipe", "message"), [({"mask_rule": "nope"}, r"recipe `mask_rule` is 'nope'; valid"),
                                                 ({"colour": "red"}, r"unknown entry 'colour'")])
def test_a_tampered_recipe_is_refused(recipe, message):
    data = json.loads(plan_realignment({HAND_ORDER[0]: 0.5}, {HAND_ORDER[0]: (1, 2)}, NLSRConfig()).to_json())
    data["recipe"] = recipe
    with pytest.raises(ValueError, match=message):
        RealignmentPlan.from_dict(data)


def test_card_names_the_recipe_that_ran():
    sims = {name: 0.1 * i for i, name in enumerate(HAND_ORDER[:7])}
    plan = plan_realignment(sims, {n: (3, 10) for n in sims}, NLSRConfig(compat=True))
    text = str(render_card(plan, with_plot=False))
    assert ("scorer `low_rank_sequential`, mask rule `strict_threshold`, selection `adaptive` (draw order "
            "`layer_major`), restoration `swap` (B_e `unscaled`)") in text


def test_compat_realignment_runs_the_published_recipe(trio):
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                          config=NLSRConfig(compat=True, max_calibration_samples=8))
    result = patcher.realign(dry_run=True, progress=False)
    assert dict(result.plan.recipe) == PUBLISHED
    meta = result.safety_patch.metadata
    assert (meta["scorer"], meta["mask_rule"]) == ("low_rank_sequential", "strict_threshold")
    for mask in result.safety_patch.masks.values():  # never more than N - int(N·P_SR) - 1 entries per factor
        for part in (mask.A, mask.B):
            assert int(part.sum()) <= part.numel() - int(part.numel() * 0.8) - 1


def test_dense_restorers_record_the_top_k_masks_they_apply():
    """The dense restorers mask the dense update with top-k whatever `mask_rule` says; the plan says so."""
    from nlsr_hub.restorers import RestoreInputs, restore

    g = torch.Generator().manual_seed(5)
    names = HAND_ORDER[:2]
    reference = LoraAdapter({n: LoraModule(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 1.0)
                             for n in names}, {})
    finetuned = LoraAdapter({n: LoraModule(m.A + 0.1, m.B, 1.0) for n, m in reference.modules.items()}, {})
    masks = {n: ModuleMask(A=torch.ones(2, 6, dtype=torch.bool), B=torch.ones(4, 2, dtype=torch.bool)) for n in names}
    patch = SafetyPatch(reference=reference, masks=masks, input_norms={n: torch.ones(6) for n in names})
    config = NLSRConfig(restorer="nlsr-addback", compat=True, selection="fraction", fraction=1.0)
    plan, _ = restore(RestoreInputs(finetuned=finetuned, patch=patch), config, build=False)
    assert plan.recipe_value("mask_rule") == "top_k" and plan.recipe_value("draw_order") == "layer_major"

"""The fast paths of step (b) against the straightforward definitions: one float32 copy per factor, masks as uint8,
reused float32 buffers, the reference side's squared norm kept on the safety patch, and Eq. 11 written block by
block in the factors' own dtype. Each must give the values (similarities) or the bits (realigned factors) that the
plain formulas give."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nlsr_hub.adapters import LoraAdapter, LoraModule
from nlsr_hub.config import NLSRConfig
from nlsr_hub.masks import ModuleMask
from nlsr_hub.patch import apply_plan, neuron_counts, restore_neurons, similarities
from nlsr_hub.plan import plan_realignment
from nlsr_hub.safety_patch import SafetyPatch
from nlsr_hub.similarity import lowrank_cosine, masked_squared_norm, module_similarity

SHAPES = {"model.layers.0.mlp.down_proj": (24, 40), "model.layers.0.self_attn.q_proj": (24, 24),
          "model.layers.1.mlp.up_proj": (40, 24), "model.layers.1.self_attn.k_proj": (8, 24)}


def random_adapter(seed: int, dtype: torch.dtype, rank: int = 6, scale: float = 2.0,
                   like: LoraAdapter | None = None) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d_out, d_in) in SHAPES.items():
        A, B = torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)
        if like is not None:  # correlated with `like`, so the cosines are far from 0
            A, B = like.modules[name].A.float() + 0.4 * A, like.modules[name].B.float() + 0.4 * B
        modules[name] = LoraModule(A.to(dtype), B.to(dtype), scale)
    return LoraAdapter(modules=modules, config={"r": rank, "lora_alpha": int(scale * rank), "peft_type": "LORA"})


def random_masks(reference: LoraAdapter, granularity: str, seed: int = 7) -> dict[str, ModuleMask]:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in reference.modules.items():
        if granularity == "element":
            masks[name] = ModuleMask(A=torch.rand(module.A.shape, generator=generator) < 0.3,
                                     B=torch.rand(module.B.shape, generator=generator) < 0.3)
        else:
            masks[name] = ModuleMask(A=None, B=torch.rand(module.shape[0], 1, generator=generator) < 0.3)
    return masks


def make_patch(dtype: torch.dtype, granularity: str = "element") -> SafetyPatch:
    reference = random_adapter(1, dtype, scale=3.8)
    return SafetyPatch(reference=reference, masks=random_masks(reference, granularity))


# ------------------------------------------------------------------- the definitions the fast paths must match


def masked_dense_definition(module: LoraModule, mask: ModuleMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_B ⊙ s·B, M_A ⊙ A)`` written out plainly, in float32."""
    B = module.B.float() * module.scale * mask.B
    A = module.A.float() if mask.A is None else module.A.float() * mask.A
    return B, A


def dense_cosine(patch: SafetyPatch, finetuned: LoraAdapter, name: str) -> float:
    """The masked products formed densely in float64."""
    mask = patch.masks[name]
    P = torch.matmul(*(t.double() for t in masked_dense_definition(patch.reference.modules[name], mask)))
    Q = torch.matmul(*(t.double() for t in masked_dense_definition(finetuned.modules[name], mask)))
    return float((P * Q).sum() / (P.norm() * Q.norm()))


def old_similarity(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask) -> float:
    """The similarity as computed before the fast paths: fresh float32 products, three inner products."""
    def inner(B1, A1, B2, A2):
        return float(torch.sum((B1.T @ B2) * (A1 @ A2.T)))

    B_e, A_e = masked_dense_definition(reference, mask)
    B_t, A_t = masked_dense_definition(finetuned, mask)
    squared1, squared2 = inner(B_e, A_e, B_e, A_e), inner(B_t, A_t, B_t, A_t)
    return max(-1.0, min(1.0, inner(B_e, A_e, B_t, A_t) / (squared1 ** 0.5 * squared2 ** 0.5)))


def old_restore_neurons(reference: LoraModule, finetuned: LoraModule, mask: ModuleMask) -> LoraModule:
    """Eq. 11 as `restore_neurons` computed it before: everything in float32, concatenated, then cast."""
    ratio = reference.scale / finetuned.scale
    A_e, A_t = reference.A.to(torch.float32), finetuned.A.to(torch.float32)
    if mask.A is not None:
        A_e, A_t = A_e * mask.A, A_t * ~mask.A
    B_e = reference.B.to(torch.float32) * ratio * mask.B
    B_t = finetuned.B.to(torch.float32) * ~mask.B
    A = torch.cat([A_e, A_t], dim=0).to(finetuned.A.dtype)
    B = torch.cat([B_e, B_t], dim=1).to(finetuned.B.dtype)
    return LoraModule(A, B, finetuned.scale)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (so -0.0 and 0.0 differ)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return torch.equal(x.contiguous().view(as_int), y.contiguous().view(as_int))


# ------------------------------------------------------------------- similarity


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_similarities_equal_the_masked_dense_definition(dtype, granularity):
    patch = make_patch(dtype, granularity)
    finetuned = random_adapter(2, dtype, like=patch.reference)
    got = similarities(patch, finetuned)
    assert sorted(got) == sorted(SHAPES)
    for name, value in got.items():
        reference, mask = patch.reference.modules[name], patch.masks[name]
        definition = lowrank_cosine(*masked_dense_definition(reference, mask),
                                    *masked_dense_definition(finetuned.modules[name], mask))
        assert value == pytest.approx(definition, abs=1e-6), name
        assert value == pytest.approx(dense_cosine(patch, finetuned, name), abs=1e-6), name
        assert 0.3 < value < 1.0  # correlated adapters: the check above is not comparing zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_similarities_are_bit_identical_to_the_plain_float32_computation(dtype):
    patch = make_patch(dtype)
    finetuned = random_adapter(2, dtype, like=patch.reference)
    for _ in range(2):  # the second pass reads the reference side from the patch
        got = similarities(patch, finetuned)
        for name, value in got.items():
            assert value == old_similarity(patch.reference.modules[name], finetuned.modules[name],
                                           patch.masks[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_norms_kept_on_the_patch_equal_recomputing_them(dtype):
    patch = make_patch(dtype)
    assert patch.reference_squared_norms == {}
    first, second = random_adapter(2, dtype, like=patch.reference), random_adapter(3, dtype, like=patch.reference)
    sims_first = similarities(patch, first)
    kept = dict(patch.reference_squared_norms)
    assert sorted(kept) == sorted(SHAPES)
    for name, squared in kept.items():
        assert squared == masked_squared_norm(patch.reference.modules[name], patch.masks[name])
    # a further adapter against the same patch: the kept norms are used and left as they were, and the values
    # equal those of a patch that recomputes everything
    sims_second = similarities(patch, second)
    assert patch.reference_squared_norms == kept
    fresh = SafetyPatch(reference=patch.reference, masks=patch.masks)
    assert similarities(fresh, second) == sims_second
    assert similarities(patch, first) == sims_first
    for name, value in sims_second.items():
        reference, finetuned, mask = patch.reference.modules[name], second.modules[name], patch.masks[name]
        assert value == module_similarity(reference, finetuned, mask, name)
        assert value == module_similarity(reference, finetuned, mask, name, reference_squared=kept[name])


def test_a_patch_with_other_masks_does_not_inherit_the_kept_norms():
    patch = make_patch(torch.float32)
    finetuned = random_adapter(2, torch.float32, like=patch.reference)
    similarities(patch, finetuned)
    other = dataclasses.replace(patch, masks=random_masks(patch.reference, "element", seed=11))
    assert other.reference_squared_norms == {}
    assert similarities(other, finetuned) == similarities(SafetyPatch(reference=other.reference, masks=other.masks),
                                                          finetuned)
    assert other.reference_squared_norms != patch.reference_squared_norms


def test_neuron_counts_equal_the_mask_sums():
    for granularity in ("element", "row"):
        patch = make_patch(torch.float32, granularity)
        for name, (critical, total) in neuron_counts(patch).items():
            mask = patch.masks[name]
            expected = int(mask.B.sum()) + (0 if mask.A is None else int(mask.A.sum()))
            assert (critical, total) == (expected, mask.total())


# ------------------------------------------------------------------- Eq. 11


DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize(("reference_dtype", "finetuned_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("granularity", "finetuned_rank"), [("element", 6), ("row", 6), ("row", 3)])
def test_restore_neurons_is_bit_identical_to_the_float32_formula(reference_dtype, finetuned_dtype, granularity,
                                                                 finetuned_rank):
    reference = random_adapter(1, reference_dtype, scale=3.8)
    finetuned = random_adapter(2, finetuned_dtype, rank=finetuned_rank, scale=1.3)
    masks = random_masks(reference, granularity)
    for name, mask in masks.items():
        expected = old_restore_neurons(reference.modules[name], finetuned.modules[name], mask)
        got = restore_neurons(reference.modules[name], finetuned.modules[name], mask)
        assert same_bits(got.A, expected.A) and same_bits(got.B, expected.B), name
        assert got.scale == expected.scale
        assert got.A.is_contiguous() and got.B.is_contiguous()
        assert bool((got.B == 0).any() and torch.signbit(got.B[got.B == 0]).any())  # signed zeros were compared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_plan_is_bit_identical_to_the_float32_formula_and_leaves_inputs_alone(dtype):
    patch = make_patch(dtype)
    finetuned = random_adapter(2, dtype, like=patch.reference)
    before = {name: (m.A.clone(), m.B.clone()) for name, m in finetuned.modules.items()}
    config = NLSRConfig(selection="threshold", threshold=0.999)  # every module patched
    plan = plan_realignment(similarities(patch, finetuned), neuron_counts(patch), config)
    assert plan.num_patched == len(SHAPES)
    realigned = apply_plan(finetuned, patch, plan)
    for name in SHAPES:
        expected = old_restore_neurons(patch.reference.modules[name], finetuned.modules[name], patch.masks[name])
        assert same_bits(realigned.modules[name].A, expected.A) and same_bits(realigned.modules[name].B, expected.B)
        assert same_bits(finetuned.modules[name].A, before[name][0])
        assert same_bits(finetuned.modules[name].B, before[name][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norms_filled_ahead_travel_with_the_pickled_patch_and_change_no_similarity(dtype):
    import pickle

    from nlsr_hub.patch import fill_reference_norms

    patch = make_patch(dtype)
    finetuned = random_adapter(2, dtype, like=patch.reference)
    expected = similarities(SafetyPatch(reference=patch.reference, masks=patch.masks), finetuned)
    assert fill_reference_norms(patch) is patch
    assert sorted(patch.reference_squared_norms) == sorted(SHAPES)
    shipped = pickle.loads(pickle.dumps(patch))  # what a Ray task receives from the object store
    assert shipped.reference_squared_norms == patch.reference_squared_norms
    assert similarities(shipped, finetuned) == expected

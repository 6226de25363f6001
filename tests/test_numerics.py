"""Numerics of the pure tensor functions, each against a dense or brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch

from nlsr_hub import load_adapter, load_calibration, save_adapter
from nlsr_hub.adapters import LoraModule
from nlsr_hub.calibration import encode_pairs
from nlsr_hub.masks import mask_from_scores, top_fraction_mask
from nlsr_hub.reference import build_reference, expo_module
from nlsr_hub.scoring import kept_directions, project_A, project_B
from nlsr_hub.similarity import lowrank_cosine, lowrank_inner, masked_factors, module_similarity
from nlsr_hub.statistics import collect_statistics


def dense_cosine(P: torch.Tensor, Q: torch.Tensor) -> float:
    P, Q = P.double(), Q.double()
    return float((P * Q).sum() / (P.norm() * Q.norm()))


# --------------------------------------------------------------------------------------------- similarity


@pytest.mark.parametrize(("r1", "r2"), [(1, 1), (4, 4), (8, 3), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lowrank_cosine_equals_dense_frobenius_cosine(r1, r2, dtype):
    generator = torch.Generator().manual_seed(100 * r1 + r2)
    d_out, d_in = 48, 40
    B1, A1 = torch.randn(d_out, r1, generator=generator), torch.randn(r1, d_in, generator=generator)
    B2 = torch.randn(d_out, r2, generator=generator)
    A2 = torch.randn(r2, d_in, generator=generator)
    if r1 == r2:  # make the two products correlated, so the cosine is far from 0
        B2, A2 = B1 + 0.3 * B2, A1 + 0.3 * A2
    B1, A1, B2, A2 = (t.to(dtype) for t in (B1, A1, B2, A2))
    expected = dense_cosine(B1.double() @ A1.double(), B2.double() @ A2.double())
    got = lowrank_cosine(B1, A1, B2, A2)
    # fp32 accumulation even for bf16 inputs: agreement to fp32 precision, not bf16 precision (~1e-2)
    assert got == pytest.approx(expected, abs=2e-6)
    inner = float(((B1.double() @ A1.double()) * (B2.double() @ A2.double())).sum())
    assert lowrank_inner(B1, A1, B2, A2) == pytest.approx(inner, rel=1e-5)
    assert lowrank_cosine(B1, A1, B1, A1) == pytest.approx(1.0, abs=1e-6)
    assert lowrank_cosine(B1, A1, -B1, A1) == pytest.approx(-1.0, abs=1e-6)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values as `t`, stored `offset` elements into a fresh buffer (as tensors read from a file are)."""
    storage = torch.empty(offset + t.numel(), dtype=t.dtype)
    storage[offset:] = t.reshape(-1)
    return storage[offset:].view(t.shape)


def test_lowrank_cosine_does_not_depend_on_memory_alignment():
    """Equal values must give an equal similarity, wherever the tensors sit in memory (a plan is reproducible
    whether the adapter came from one file, another file or a saved safety patch)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        B1, A1 = torch.randn(128, 8, generator=generator), torch.randn(8, 64, generator=generator)
        B2 = B1 + 0.05 * torch.randn(128, 8, generator=generator)
        A2 = A1 + 0.05 * torch.randn(8, 64, generator=generator)
        values = {lowrank_cosine(B1, A1, at_offset(B2, k), at_offset(A2, k)) for k in (0, 1, 2, 3, 4, 8, 16)}
        assert len(values) == 1, values


def test_lowrank_cosine_of_zero_products():
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    zero_B = torch.zeros(6, 2)
    assert lowrank_cosine(zero_B, A, zero_B, A) == 1.0
    assert lowrank_cosine(B, A, zero_B, A) == 0.0


def test_module_similarity_is_the_masked_dense_cosine():
    generator = torch.Generator().manual_seed(3)
    ref = LoraModule(torch.randn(4, 10, generator=generator), torch.randn(12, 4, generator=generator), 3.8)
    ft = LoraModule(ref.A + 0.5 * torch.randn(4, 10, generator=generator),
                    ref.B + 0.5 * torch.randn(12, 4, generator=generator), 2.0)
    mask = mask_from_scores(torch.rand(4, 10, generator=generator), torch.rand(12, 4, generator=generator), 0.5)
    masked_ref = ref.scale * (ref.B.double() * mask.B) @ (ref.A.double() * mask.A)
    masked_ft = ft.scale * (ft.B.double() * mask.B) @ (ft.A.double() * mask.A)
    assert module_similarity(ref, ft, mask) == pytest.approx(dense_cosine(masked_ref, masked_ft), abs=1e-6)
    B, A = masked_factors(ref, mask)
    assert B.dtype == A.dtype == torch.float32
    assert torch.allclose((B @ A).double(), masked_ref, atol=1e-5)


# --------------------------------------------------------------------------------------------- low-rank scorer


def svd_projection(S: torch.Tensor, W: torch.Tensor, k: int) -> torch.Tensor:
    """``V·Vᵀ·W`` with V the top-k right singular vectors of `S` (the ActSVD step, from stored activations)."""
    _, _, Vh = torch.linalg.svd(S, full_matrices=False)
    V = Vh[:k].T
    return V @ (V.T @ W)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_low_rank_projections_from_the_gram_equal_the_svd_of_stored_activations(k):
    generator = torch.Generator().manual_seed(k)
    tokens, d_in, r, d_out = 200, 24, 6, 30
    X = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, d_in,
                                                                                                dtype=torch.float64)
    A = torch.randn(r, d_in, generator=generator, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=generator, dtype=torch.float64)
    Z = X @ A.T  # A's output: S for A, and B's input
    gram = Z.T @ Z
    assert torch.allclose(project_A(A, gram, k), svd_projection(Z, A, k), atol=1e-9)
    assert torch.allclose(project_B(B, gram, k), svd_projection(Z @ B.T, B, k), atol=1e-9)
    # k = r keeps everything: the projection is the identity on the factor
    assert torch.allclose(project_A(A, gram, r), A, atol=1e-9)
    assert torch.allclose(project_B(B, gram, r), B, atol=1e-9)


@pytest.mark.parametrize(
    ("rank", "sparsity", "paper", "compat"),
    [(128, 0.8, 26, 102), (8, 0.8, 2, 6), (16, 0.5, 8, 8), (10, 0.7, 3, 7), (64, 0.9, 6, 57), (4, 0.95, 1, 3)],
)
def test_kept_directions(rank, sparsity, paper, compat):
    assert kept_directions(rank, sparsity) == paper == max(1, round(rank * (1 - sparsity)))
    assert kept_directions(rank, sparsity, compat=True) == compat == int(rank * sparsity)


# --------------------------------------------------------------------------------------------- EXPO


def test_expo_without_weak_scales_the_product_not_the_factors(trio):
    aligned = load_adapter(trio.aligned)
    for beta in (0.9, 0.5, 0.0):
        reference = build_reference(aligned, beta=beta)
        assert set(reference.modules) == set(aligned.modules)
        for name, module in aligned.modules.items():
            ref = reference[name]
            assert torch.equal(ref.A, module.A) and torch.equal(ref.B, module.B)  # factors untouched
            assert ref.scale == pytest.approx((1 + beta) * module.scale, rel=1e-15)
            assert torch.allclose(ref.delta().double(), (1 + beta) * module.delta().double(), rtol=1e-6)


def test_compat_expo_scales_both_factors_so_the_product_by_four_beta_squared(trio):
    aligned = load_adapter(trio.aligned)
    beta = 0.9
    reference = build_reference(aligned, beta=beta, compat=True)
    for name, module in aligned.modules.items():
        ref = reference[name]
        assert ref.scale == module.scale
        assert torch.allclose(ref.A, 2 * beta * module.A) and torch.allclose(ref.B, 2 * beta * module.B)
        assert torch.allclose(ref.delta(), (2 * beta) ** 2 * module.delta(), rtol=1e-5, atol=1e-6)
    assert (2 * beta) ** 2 == pytest.approx(3.24)


def test_expo_with_weak_is_exact_concatenation():
    generator = torch.Generator().manual_seed(5)
    aligned = LoraModule(torch.randn(4, 9, generator=generator), torch.randn(7, 4, generator=generator), 2.0)
    weak = LoraModule(torch.randn(3, 9, generator=generator), torch.randn(7, 3, generator=generator), 0.5)
    ref = expo_module(aligned, weak, 0.9)
    assert ref.rank == 7
    expected = 1.9 * aligned.delta().double() - 0.9 * weak.delta().double()
    assert torch.allclose(ref.delta().double(), expected, atol=1e-5)
    only_weak = expo_module(None, weak, 0.9)
    assert torch.allclose(only_weak.delta().double(), -0.9 * weak.delta().double(), atol=1e-6)


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(("shape", "keep"), [((8, 64), 0.2), ((64, 8), 0.2), ((10,), 0.3), ((7, 3), 0.5),
                                              ((5, 5), 1.0), ((3, 3), 0.01)])
def test_top_fraction_mask_keeps_exactly_round_keep_numel_largest(shape, keep):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    mask = top_fraction_mask(scores, keep)
    expected = max(1, math.floor(keep * scores.numel() + 0.5))  # halves round up
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == expected
    if expected < scores.numel():  # the kept ones are the largest
        assert scores[mask].min() > scores[~mask].max()


def test_top_fraction_mask_breaks_ties_deterministically():
    scores = torch.ones(4, 5)
    mask = top_fraction_mask(scores, 0.2)
    assert int(mask.sum()) == 4
    assert torch.equal(mask, top_fraction_mask(scores.clone(), 0.2))
    assert mask.reshape(-1)[:4].all()  # by position


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_top_fraction_mask_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="`keep`"):
        top_fraction_mask(torch.rand(3, 3), keep)


def test_element_and_row_mask_shapes():
    r, d_in, d_out = 8, 64, 128
    score_A, score_B = torch.rand(r, d_in), torch.rand(d_out, r)
    element = mask_from_scores(score_A, score_B, 0.8, "element")
    assert element.granularity == "element"
    assert element.A.shape == (r, d_in) and element.B.shape == (d_out, r)
    assert int(element.A.sum()) == round(0.2 * r * d_in) and int(element.B.sum()) == round(0.2 * d_out * r)
    assert element.count() == round(0.2 * r * d_in) + round(0.2 * d_out * r)
    assert element.total() == r * d_in + d_out * r
    row = mask_from_scores(score_A, score_B, 0.8, "row")
    assert row.granularity == "row" and row.A is None
    assert row.B.shape == (d_out, 1) and row.B.dtype == torch.bool
    assert row.count() == round(0.2 * d_out) and row.total() == d_out
    top_rows = torch.topk(score_B.double().sum(dim=1), round(0.2 * d_out)).indices
    assert row.B[top_rows, 0].all()
    with pytest.raises(ValueError, match="granularity"):
        mask_from_scores(score_A, score_B, 0.8, "column")


# --------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_gram_statistics_equal_brute_force_over_response_tokens(name, trio, default_run, load_base, tokenizer,
                                                                tmp_path):
    from peft import PeftModel

    patcher, _ = default_run
    reference = patcher.reference_adapter()
    pairs = load_calibration(None)[:6]
    stats = collect_statistics(load_base(), tokenizer, reference, pairs, needs=frozenset({"activations"}),
                               batch_size=4, max_length=512, progress=False)[name]

    # Brute force: stock PEFT loads the saved reference; store A's inputs and outputs, one sample at a time.
    save_adapter(reference, tmp_path / "reference")
    model = PeftModel.from_pretrained(load_base(), str(tmp_path / "reference")).eval()
    stored: list[tuple[torch.Tensor, torch.Tensor]] = []
    lora_A = model.base_model.model.get_submodule(name).lora_A["default"]
    handle = lora_A.register_forward_hook(lambda _m, inputs, output: stored.append((inputs[0][0], output[0])))
    masks = []
    try:
        with torch.no_grad():
            for sample in encode_pairs(tokenizer, pairs, 512):
                model(input_ids=torch.tensor([sample.input_ids]))
                masks.append(torch.tensor(sample.response_mask))
    finally:
        handle.remove()
    X = torch.cat([x for x, _ in stored]).double()
    Z = torch.cat([z for _, z in stored]).double()
    response = torch.cat(masks)
    assert 0 < int(response.sum()) < response.numel()
    gram_response = Z[response].T @ Z[response]
    gram_all = Z.T @ Z
    assert stats.tokens == int(response.sum())
    assert stats.gram.dtype == torch.float64 and stats.gram.shape == (reference[name].rank,) * 2
    assert torch.allclose(stats.gram, gram_response, rtol=1e-4, atol=1e-4 * float(gram_response.abs().max()))
    assert torch.allclose(stats.input_sq, X[response].square().sum(dim=0), rtol=1e-4, atol=1e-6)
    # prompt tokens are excluded: the all-token Gram is clearly different
    assert not torch.allclose(stats.gram, gram_all, rtol=1e-2)
    assert math.isfinite(float(stats.gram.sum()))

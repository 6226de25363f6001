"""Every restorer of the registry against its dense definition on small adapters: exact where it is exact, the SVD
error bound where it is not; untouched modules bit-identical; determinism; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from nlsr_hub import NLSRConfig, NLSRPatcher
from nlsr_hub.adapters import LoraAdapter, LoraModule, load_adapter
from nlsr_hub.lowrank import add_dense, combine, kept_rank, truncated_svd
from nlsr_hub.masks import ModuleMask
from nlsr_hub.restorers import RESTORERS, RestoreInputs, restore
from nlsr_hub.restorers.dense import dense_mask, masked_cosine
from nlsr_hub.safety_patch import SafetyPatch

NAMES = [f"model.layers.{i}.mlp.{kind}" for i in range(3) for kind in ("up_proj", "down_proj")]


def _adapter(seed: int, *, rank: int = 4, scale: float = 2.0, drift: LoraAdapter | None = None) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for i, name in enumerate(NAMES):
        A, B = torch.randn(rank, 24, generator=generator), torch.randn(32, rank, generator=generator)
        if drift is not None:  # resumed from `drift`: same basis plus a per-module change
            A, B = drift.modules[name].A + 0.1 * (i + 1) * A, drift.modules[name].B + 0.1 * (i + 1) * B
        modules[name] = LoraModule(A, B, scale)
    return LoraAdapter(modules=modules, config={"r": rank, "lora_alpha": int(rank * scale)})


def _patch(reference: LoraAdapter, seed: int = 7) -> SafetyPatch:
    generator = torch.Generator().manual_seed(seed)
    masks = {n: ModuleMask(A=torch.ones(m.A.shape, dtype=torch.bool), B=torch.ones(m.B.shape, dtype=torch.bool))
             for n, m in reference.modules.items()}
    norms = {n: torch.rand(m.shape[1], generator=generator) + 0.1 for n, m in reference.modules.items()}
    return SafetyPatch(reference=reference, masks=masks, input_norms=norms)


@pytest.fixture(scope="module")
def pair() -> tuple[LoraAdapter, LoraAdapter]:
    aligned = _adapter(0)
    return aligned, _adapter(1, drift=aligned)


def _deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {n: m.delta().double() for n, m in adapter.modules.items()}


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.5])
def test_addback_and_interpolate_equal_their_dense_definitions(pair, strength):
    aligned, finetuned = pair
    inputs = RestoreInputs(finetuned=finetuned, aligned=aligned)
    for name, expected in (("addback", lambda t, a: t + strength * a),
                           ("interpolate", lambda t, a: t + strength * (a - t))):
        plan, adapter = restore(inputs, NLSRConfig(restorer=name, strength=strength))
        for module in NAMES:
            want = expected(finetuned.modules[module].delta().double(), aligned.modules[module].delta().double())
            assert torch.allclose(adapter.modules[module].delta().double(), want, atol=1e-5)
        assert plan.num_patched == (0 if strength == 0.0 else len(NAMES))
        assert plan.restorer == name
    plan, adapter = restore(inputs, NLSRConfig(restorer="addback", strength=0.0))
    assert adapter is finetuned  # nothing to do: the fine-tuned adapter itself


def test_addback_rank_is_the_sum_and_a_dry_run_gives_the_same_plan(pair):
    aligned, finetuned = pair
    inputs, config = RestoreInputs(finetuned=finetuned, aligned=aligned), NLSRConfig(restorer="addback")
    plan, adapter = restore(inputs, config)
    assert all(m.rank == 8 for m in adapter.modules.values())
    assert all(d.rank is None and d.error is None for d in plan.modules)  # exact: nothing to report
    dry, none = restore(inputs, config, build=False)
    assert none is None and dry == plan


def test_safelora_restorer_matches_the_safelora_function(pair):
    from nlsr_hub.safelora import safelora

    aligned, finetuned = pair
    config = NLSRConfig(restorer="safelora", selection="fraction", fraction=0.5)
    plan, adapter = restore(RestoreInputs(finetuned=finetuned, aligned=aligned), config)
    expected, decisions = safelora(aligned, finetuned, lowest=3)
    assert sorted(plan.patched) == sorted(d.name for d in decisions if d.projected)
    for name in NAMES:
        assert torch.equal(adapter.modules[name].B, expected.modules[name].B)


def _dense_definition(reference: LoraModule, finetuned: LoraModule, norm: torch.Tensor, sparsity: float,
                      granularity: str) -> torch.Tensor:
    """The mask written out densely: top (1 - sparsity) of |dW_e| * ||x_j|| (entries, or rows by their sum)."""
    scores = reference.delta().double().abs() * norm.double()[None, :]
    keep = round((1 - sparsity) * (scores.shape[0] if granularity == "row" else scores.numel()))
    if granularity == "row":
        rows = torch.zeros(scores.shape[0], dtype=torch.bool)
        rows[torch.argsort(scores.sum(1), descending=True, stable=True)[:keep]] = True
        return rows[:, None].expand_as(scores)
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[torch.argsort(scores.reshape(-1), descending=True, stable=True)[:keep]] = True
    return flat.reshape(scores.shape)


@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("name", ["nlsr-dense", "nlsr-addback"])
def test_dense_restorers_against_the_dense_definition(pair, granularity, name):
    aligned, finetuned = pair
    patch = _patch(aligned)
    config = NLSRConfig(restorer=name, granularity=granularity, selection="fraction", fraction=0.5,
                        sparsity_ratio=0.75, strength=1.5, kept_energy=1.0)
    plan, adapter = restore(RestoreInputs(finetuned=finetuned, patch=patch), config)
    assert plan.num_patched == 3
    for module in NAMES:
        ref, ft = aligned.modules[module], finetuned.modules[module]
        mask = _dense_definition(ref, ft, patch.input_norms[module], 0.75, granularity)
        got_mask = dense_mask(ref, patch.input_norms[module], 0.75, granularity)
        assert torch.equal(got_mask.reshape(-1, 1).expand_as(mask) if got_mask.ndim == 1 else got_mask, mask)
        m = mask.double()
        e, t = ref.delta().double(), ft.delta().double()
        if granularity == "row":  # taken on the factors in float64: compare with the float64 product
            e64, t64 = (mod.scale * (mod.B.double() @ mod.A.double()) for mod in (ref, ft))
            cosine64 = float((m * e64 * m * t64).sum() / ((m * e64).norm() * (m * t64).norm()))
            assert plan.decision(module).similarity == pytest.approx(cosine64, abs=1e-12)
        cosine = float((m * e * m * t).sum() / ((m * e).norm() * (m * t).norm()))
        assert plan.decision(module).similarity == pytest.approx(cosine, abs=1e-9 if granularity == "element" else 1e-7)
        if not plan.decision(module).patched:
            assert adapter.modules[module] is ft  # untouched: the very same tensors
            continue
        want = t + m * (e - t) if name == "nlsr-dense" else t + 1.5 * m * e
        assert torch.allclose(adapter.modules[module].delta().double(), want, atol=1e-4)
        if granularity == "row":  # exact: the plan equals a dry run's, the rank is the sum
            assert adapter.modules[module].rank == 8 and plan.decision(module).error is None
        else:
            assert plan.decision(module).error == pytest.approx(0.0, abs=1e-6)
    if granularity == "row":
        assert restore(RestoreInputs(finetuned=finetuned, patch=patch), config, build=False)[0] == plan


def test_element_refactorisation_error_is_bounded_by_the_kept_energy(pair):
    aligned, finetuned = pair
    config = NLSRConfig(restorer="nlsr-dense", granularity="element", selection="fraction", fraction=1.0,
                        kept_energy=0.9)
    plan, adapter = restore(RestoreInputs(finetuned=finetuned, patch=_patch(aligned)), config)
    for module in NAMES:
        ref, ft = aligned.modules[module], finetuned.modules[module]
        mask = dense_mask(ref, _patch(aligned).input_norms[module], config.sparsity_ratio, "element")
        correction = mask * (ref.delta() - ft.delta())
        got = adapter.modules[module].delta() - ft.delta()
        relative = float((got - correction).norm() / correction.norm())
        decision = plan.decision(module)
        assert decision.error <= math.sqrt(0.1) + 1e-6  # kept >= 90 % of the energy
        assert relative == pytest.approx(decision.error, abs=1e-4)
        assert decision.rank < ft.rank + min(ref.shape)  # truncated, not full


def test_truncated_svd_and_kept_rank():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert kept_rank(singular, 1.0) == 3
    assert kept_rank(singular, 9 / 14) == 1
    assert kept_rank(singular, 9 / 14 + 1e-6) == 2
    matrix = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    exact = truncated_svd(matrix, 1.0)
    assert torch.allclose(exact.B @ exact.A, matrix, atol=1e-5) and exact.error < 1e-6
    with pytest.raises(ValueError, match="kept_energy"):
        truncated_svd(matrix, 0.0)
    module = LoraModule(torch.randn(2, 12), torch.randn(20, 2), 0.5)
    out, fact = add_dense(module, torch.zeros(20, 12), 0.99)
    assert fact.error == 0.0 and torch.allclose(out.delta(), module.delta())


def test_combine_is_exact_and_drops_zero_terms():
    a = LoraModule(torch.randn(2, 5), torch.randn(4, 2), 3.0)
    b = LoraModule(torch.randn(3, 5), torch.randn(4, 3), 0.5)
    out = combine([(1.0, a), (-2.0, b), (0.0, a)], scale=1.5, dtype_A=torch.float32, dtype_B=torch.float32)
    assert out.rank == 5 and out.scale == 1.5
    assert torch.allclose(out.delta(), a.delta() - 2.0 * b.delta(), atol=1e-5)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _combine_by_concatenation(terms, rows, *, scale, dtype_A, dtype_B):
    """The earlier definition of `combine` with row masks: each masked term rounded to its own dtype, then float32
    copies concatenated and the whole rounded once."""
    kept = []
    for (c, m), r in zip(terms, rows, strict=True):
        if r is not None:
            m = LoraModule(m.A, (m.B.to(torch.float32) * r.reshape(-1, 1).to(torch.float32)).to(m.B.dtype), m.scale)
        kept.append((c, m))
    A = torch.cat([m.A.to(torch.float32) for _, m in kept], dim=0)
    B = torch.cat([m.B.to(torch.float32) * (c * m.scale / scale) for c, m in kept], dim=1)
    return A.to(dtype_A), B.to(dtype_B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("strength", [1.0, 1.5, -0.75])
def test_combine_with_row_masks_gives_the_bits_of_concatenation(dtype, strength):
    g = torch.Generator().manual_seed(3)
    t = LoraModule(torch.randn(3, 9, generator=g).to(dtype), torch.randn(11, 3, generator=g).to(dtype), 2.0)
    e = LoraModule(torch.randn(4, 9, generator=g).to(torch.float32), torch.randn(11, 4, generator=g).to(dtype), 0.7)
    rows = torch.rand(11, generator=g) < 0.4
    for masks in ([None, rows], [~rows, rows], [rows, None]):
        terms = [(1.0, t), (strength, e)]
        out = combine(terms, rows=masks, scale=t.scale, dtype_A=dtype, dtype_B=dtype)
        A, B = _combine_by_concatenation(terms, masks, scale=t.scale, dtype_A=dtype, dtype_B=dtype)
        assert out.A.dtype == out.B.dtype == dtype
        assert torch.equal(_bits(out.A), _bits(A)) and torch.equal(_bits(out.B), _bits(B))  # signed zeros too
    with pytest.raises(ValueError, match="one mask"):
        combine([(1.0, t)], rows=[None, rows], scale=1.0, dtype_A=dtype, dtype_B=dtype)
    one_wide = LoraModule(torch.ones(3, 1, dtype=dtype), torch.ones(11, 3, dtype=dtype), 1.0)  # would broadcast
    with pytest.raises(ValueError, match="one module shape"):
        combine([(1.0, t), (1.0, one_wide)], scale=1.0, dtype_A=dtype, dtype_B=dtype)


def test_restorers_are_deterministic(pair):
    aligned, finetuned = pair
    patch = _patch(aligned)
    for name in sorted(RESTORERS):
        config = NLSRConfig(restorer=name, selection="fraction", fraction=0.5, granularity="row")
        inputs = RestoreInputs(finetuned=finetuned, aligned=aligned, patch=patch)
        (plan1, a1), (plan2, a2) = restore(inputs, config), restore(inputs, config)
        assert plan1.to_json() == plan2.to_json()
        for module in NAMES:
            assert torch.equal(a1.modules[module].A, a2.modules[module].A)
            assert torch.equal(a1.modules[module].B, a2.modules[module].B)


def test_restorers_say_what_they_need(pair):
    aligned, finetuned = pair
    with pytest.raises(ValueError, match="needs the aligned adapter"):
        restore(RestoreInputs(finetuned=finetuned, patch=_patch(aligned)), NLSRConfig(restorer="addback"))
    with pytest.raises(ValueError, match="needs a safety patch"):
        restore(RestoreInputs(finetuned=finetuned, aligned=aligned), NLSRConfig(restorer="nlsr-dense"))
    bare = SafetyPatch(reference=aligned, masks=_patch(aligned).masks)
    with pytest.raises(ValueError, match="input-activation norms"):
        restore(RestoreInputs(finetuned=finetuned, patch=bare), NLSRConfig(restorer="nlsr-dense"))
    with pytest.raises(ValueError, match="Unknown `restorer`"):
        NLSRConfig(restorer="magic")
    for field, value in (("strength", -1.0), ("strength", float("nan")), ("kept_energy", 0.0), ("beta", math.inf)):
        with pytest.raises(ValueError, match=field):
            NLSRConfig(**{field: value})


def test_masked_cosine_edge_cases():
    zero = LoraModule(torch.zeros(1, 3), torch.zeros(2, 1), 1.0)
    one = LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0)
    rows = torch.tensor([True, False])
    assert masked_cosine(zero, zero, rows) == 1.0
    assert masked_cosine(one, zero, rows) == 0.0
    assert masked_cosine(one, one, rows) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["addback", "nlsr-dense", "nlsr-addback", "interpolate"])
def test_patcher_realigns_with_each_restorer_and_saves_a_loadable_adapter(trio, tmp_path, name):
    """End to end on the tiny trio: the saved adapter loads with PEFT's rank/alpha patterns and equals the result."""
    config = NLSRConfig(restorer=name, granularity="row", selection="fraction", fraction=0.5, strength=0.5,
                        max_calibration_samples=4)
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config)
    result = patcher.realign(progress=False)
    out = result.save_pretrained(tmp_path / name)
    loaded = load_adapter(out)
    for module, original in result.adapter.modules.items():
        assert torch.allclose(loaded.modules[module].delta(), original.delta(), atol=1e-6)
    assert result.plan.restorer == name
    card = (out / "README.md").read_text()
    assert f"restorer `{name}`" in card and "Neuron-Level Safety Realignment" not in card  # says what was done
    assert (result.safety_patch is None) == (RESTORERS[name].needs == "aligned")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trio.base), str(out))
    assert model is not None


def test_presets_and_the_cli_restorer_flags():
    from nlsr_hub.cli import build_parser, config_from_args

    paper = NLSRConfig.preset("paper")
    assert (paper.restorer, paper.selection, paper.granularity, paper.beta) == ("nlsr", "adaptive", "element", 0.9)
    default = NLSRConfig.preset("default")  # the head-to-head's winner: the reference's critical rows added back
    assert (default.restorer, default.granularity, default.selection, default.fraction) == (
        "nlsr-addback", "row", "fraction", 1.0)
    with pytest.raises(ValueError, match="Unknown preset"):
        NLSRConfig.preset("fast")
    args = build_parser().parse_args(["plan", "--base", "b", "--aligned", "a", "--finetuned", "f", "--preset", "paper",
                                      "--fraction", "0.3"])
    assert config_from_args(args) == paper.replace(fraction=0.3)  # flags win over the preset
    args = build_parser().parse_args(["plan", "--base", "b", "--aligned", "a", "--finetuned", "f"])
    assert config_from_args(args) == default  # no preset: the default preset
    args = build_parser().parse_args(["plan", "--base", "b", "--aligned", "a", "--finetuned", "f", "--restorer",
                                      "addback", "--strength", "1.5"])
    assert config_from_args(args).restorer == "addback" and config_from_args(args).strength == 1.5


def test_aligned_restorers_also_run_from_a_saved_safety_patch(trio, tmp_path):
    """EXPO without a weak adapter only rescales the update, so a safety patch gives back ΔW_a exactly: `addback`
    from a patch equals `addback` from the aligned adapter (fleet mode needs no aligned adapter)."""
    from nlsr_hub import SafetyPatch

    config = NLSRConfig(restorer="addback", strength=0.7, max_calibration_samples=4)
    direct = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned, config=config)
    want = direct.realign(progress=False).adapter
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, config=NLSRConfig(max_calibration_samples=4))
    patcher.safety_patch(progress=False).save_pretrained(tmp_path / "patch")
    from_patch = NLSRPatcher.from_pretrained(None, finetuned=trio.finetuned, safety_patch=tmp_path / "patch",
                                             config=config)
    got = from_patch.realign(progress=False).adapter
    for name, module in want.modules.items():
        assert torch.allclose(got.modules[name].delta(), module.delta(), atol=1e-6)
    supplied = SafetyPatch.from_pretrained(tmp_path / "patch")
    supplied = SafetyPatch(reference=supplied.reference, masks=supplied.masks,
                           metadata={**supplied.metadata, "reference_source": "supplied"})
    with pytest.raises(ValueError, match="cannot give back the aligned adapter"):
        supplied.aligned_update()


@pytest.mark.parametrize("name", ["nlsr-dense", "nlsr-addback"])
def test_row_restorers_form_no_dense_update_per_adapter_once_the_patch_is_prepared(pair, name, monkeypatch, capsys):
    aligned, finetuned = pair
    config = NLSRConfig(restorer=name, granularity="row", selection="fraction", fraction=0.5, sparsity_ratio=0.75)
    fresh = restore(RestoreInputs(finetuned=finetuned, patch=_patch(aligned)), config)
    prepared = _patch(aligned)
    monkeypatch.setattr("nlsr_hub.restorers.dense.BAR_DELAY", 0.0)  # a large model's preparation: minutes
    RESTORERS[name].prepare(prepared, config, progress=True)
    bar = capsys.readouterr().err  # a bar over the modules
    assert "preparing the patch's row masks" in bar and f"{len(aligned.modules)}/{len(aligned.modules)}" in bar
    assert sorted(prepared.row_memo) == [(module, 0.75) for module in sorted(aligned.modules)]
    for module, reference in aligned.modules.items():  # the memo's rows are the dense definition's
        assert torch.equal(prepared.row_memo[(module, 0.75)][0],
                           dense_mask(reference, prepared.input_norms[module], 0.75, "row"))

    def no_dense(self):
        raise AssertionError("a dense update was formed")

    monkeypatch.setattr(LoraModule, "delta", no_dense)
    plan, adapter = restore(RestoreInputs(finetuned=finetuned, patch=prepared), config)
    assert plan.to_json() == fresh[0].to_json()  # the memo gives the same plan, to the byte
    for module in aligned.modules:
        assert torch.equal(adapter.modules[module].A, fresh[1].modules[module].A)
        assert torch.equal(adapter.modules[module].B, fresh[1].modules[module].B)


def test_the_row_memo_is_kept_per_sparsity_ratio(pair):
    aligned, finetuned = pair
    shared = _patch(aligned)
    for ratio in (0.75, 0.5, 0.75):  # one patch, several configs (as `choose` tries candidates): never a stale mask
        config = NLSRConfig(restorer="nlsr-addback", granularity="row", sparsity_ratio=ratio)
        got, _ = restore(RestoreInputs(finetuned=finetuned, patch=shared), config)
        want, _ = restore(RestoreInputs(finetuned=finetuned, patch=_patch(aligned)), config)
        assert got.to_json() == want.to_json()
    assert {ratio for _, ratio in shared.row_memo} == {0.75, 0.5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_scores_in_a_reused_buffer_equal_the_dense_definition_bit_for_bit(dtype):
    from nlsr_hub.restorers.dense import DenseBuffer, row_scores

    generator = torch.Generator().manual_seed(5)
    buffer = DenseBuffer()
    for d_out, d_in, rank in ((640, 1792, 16), (96, 64, 4), (1024, 512, 8)):  # grows, shrinks, grows again
        module = LoraModule(torch.randn(rank, d_in, generator=generator).to(dtype),
                            torch.randn(d_out, rank, generator=generator).to(dtype), 1.75)
        norm = torch.rand(d_in, generator=generator)
        want = (module.delta().abs() * norm.reshape(1, -1)).to(torch.float64).sum(dim=1)
        assert torch.equal(row_scores(module, norm, buffer), want)


@pytest.mark.parametrize("block", [1, 3 * 64, 7 * 64 + 5, 1 << 19])
def test_row_scores_block_by_block_equal_the_dense_definition_bit_for_bit(monkeypatch, block):
    """Blocks of one row, of several rows, of uneven rows, one block; rows long enough to be summed by two threads."""
    from nlsr_hub.restorers import dense

    monkeypatch.setattr(dense, "_BLOCK_ELEMENTS", block)
    generator = torch.Generator().manual_seed(11)
    for d_out, d_in, rank in ((300, 64, 16), (37, 96, 8), (1, 64, 3), (5, 70_000, 4)):
        module = LoraModule(torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator),
                            0.5)
        norm = torch.rand(d_in, generator=generator)
        want = (module.delta().abs() * norm.reshape(1, -1)).to(torch.float64).sum(dim=1)
        assert torch.equal(dense.row_scores(module, norm), want)


def test_a_realignment_prepares_the_patch_once_with_a_bar(pair, capsys, monkeypatch):
    aligned, finetuned = pair
    config = NLSRConfig(restorer="nlsr-addback", granularity="row", sparsity_ratio=0.75)
    patcher = NLSRPatcher(safety_patch=_patch(aligned), config=config)
    first = patcher.realign(finetuned=finetuned, progress=True)
    assert "preparing the patch's row masks" not in capsys.readouterr().err  # quick: no bar
    monkeypatch.setattr("nlsr_hub.restorers.dense.BAR_DELAY", 0.0)  # as if it took longer than the delay
    NLSRPatcher(safety_patch=_patch(aligned), config=config).realign(finetuned=finetuned, progress=True)
    assert "preparing the patch's row masks" in capsys.readouterr().err

    def no_dense(self):
        raise AssertionError("a dense update was formed")

    monkeypatch.setattr(LoraModule, "delta", no_dense)  # the patch's memo is kept: the next adapter forms none
    again = patcher.realign(finetuned=finetuned, progress=False)
    assert again.plan.to_json() == first.plan.to_json()


def test_an_adapter_on_other_modules_is_refused_before_the_patch_is_prepared(pair, monkeypatch):
    from nlsr_hub.errors import AdapterError
    from nlsr_hub.restorers import dense

    aligned, finetuned = pair
    fewer = LoraAdapter(modules=dict(list(finetuned.modules.items())[1:]), config=dict(finetuned.config))

    def no_preparation(*args, **kwargs):
        raise AssertionError("the patch was prepared for an adapter that cannot be realigned against it")

    monkeypatch.setattr(dense, "row_scores", no_preparation)
    patcher = NLSRPatcher(safety_patch=_patch(aligned), config=NLSRConfig(restorer="nlsr-addback", granularity="row"))
    with pytest.raises(AdapterError, match="target different modules"):
        patcher.realign(finetuned=fewer, progress=False)

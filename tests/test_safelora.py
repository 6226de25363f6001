"""The Safe LoRA baseline against its dense definition: projector, similarity, both selection rules."""

from __future__ import annotations

import pytest
import torch

from nlsr_hub.adapters import LoraAdapter, LoraModule
from nlsr_hub.safelora import project_B, safelora


def _adapter(seed: int, names: list[str], *, drift: LoraAdapter | None = None, amount: float = 0.0) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name in names:
        A, B = torch.randn(4, 24, generator=generator), torch.randn(32, 4, generator=generator)
        if drift is not None:  # a fine-tuned adapter close to the aligned one, by a per-module amount
            base = drift.modules[name]
            A, B = base.A + amount * (names.index(name) + 1) * A, base.B + amount * (names.index(name) + 1) * B
        modules[name] = LoraModule(A, B, 2.0)
    return LoraAdapter(modules=modules, config={"r": 4, "lora_alpha": 8})


def _dense_safelora(aligned: LoraModule, finetuned: LoraModule) -> tuple[torch.Tensor, float]:
    V = aligned.delta().double()
    C = V @ V.T / V.norm()
    W = finetuned.delta().double()
    projected = C @ W
    return projected, float((projected * W).sum() / (projected.norm() * W.norm()))


NAMES = [f"model.layers.{i}.self_attn.q_proj" for i in range(6)]


def test_projection_and_similarity_match_the_dense_definition():
    aligned = _adapter(0, NAMES)
    finetuned = _adapter(1, NAMES, drift=aligned, amount=0.2)
    out, decisions = safelora(aligned, finetuned, threshold=2.0)  # every cosine is < 2: all projected
    for decision in decisions:
        expected, cosine = _dense_safelora(aligned.modules[decision.name], finetuned.modules[decision.name])
        assert decision.projected
        assert decision.similarity == pytest.approx(cosine, abs=1e-5)
        assert torch.allclose(out.modules[decision.name].delta().double(), expected, rtol=1e-4, atol=1e-4)
    module = aligned.modules[NAMES[0]]
    assert project_B(LoraModule(module.A, torch.zeros_like(module.B), 1.0), module.B).abs().sum() == 0


def test_threshold_projects_exactly_the_modules_below_it_and_leaves_the_rest_bit_identical():
    aligned = _adapter(0, NAMES)
    finetuned = _adapter(1, NAMES, drift=aligned, amount=0.3)
    _, probe = safelora(aligned, finetuned, threshold=0.0)
    similarities = sorted(d.similarity for d in probe)
    assert len(set(similarities)) == len(NAMES)  # distinct, so a threshold between two splits them
    tau = (similarities[2] + similarities[3]) / 2
    out, decisions = safelora(aligned, finetuned, threshold=tau)
    assert sum(d.projected for d in decisions) == 3
    for d in decisions:
        assert d.projected == (d.similarity < tau)
        same = torch.equal(out.modules[d.name].B, finetuned.modules[d.name].B)
        assert same != d.projected
        assert torch.equal(out.modules[d.name].A, finetuned.modules[d.name].A)


@pytest.mark.parametrize("k", [0, 1, 4, 6])
def test_lowest_projects_the_k_least_similar_modules(k):
    aligned = _adapter(0, NAMES)
    finetuned = _adapter(1, NAMES, drift=aligned, amount=0.3)
    out, decisions = safelora(aligned, finetuned, threshold=-1.0, lowest=k)  # the threshold is ignored
    chosen = {d.name for d in sorted(decisions, key=lambda d: d.similarity)[:k]}
    assert {d.name for d in decisions if d.projected} == chosen
    assert sum(not torch.equal(out.modules[n].B, finetuned.modules[n].B) for n in NAMES) == k


def test_bad_input_is_named():
    aligned = _adapter(0, NAMES[:3])
    finetuned = _adapter(1, NAMES)
    with pytest.raises(ValueError, match="missing"):
        safelora(aligned, finetuned)
    with pytest.raises(ValueError, match=r"lowest=7 is out of range.*6 LoRA modules"):
        safelora(_adapter(0, NAMES), finetuned, lowest=7)

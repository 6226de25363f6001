"""The sequential low-rank variant: block l+1 is recorded on the model whose earlier blocks are projected."""

from __future__ import annotations

import torch

from nlsr_hub import LoraAdapter, NLSRConfig, NLSRPatcher, load_adapter
from nlsr_hub.adapters import layer_index
from nlsr_hub.calibration import default_calibration
from nlsr_hub.reference import build_reference
from nlsr_hub.scoring import low_rank_projection
from nlsr_hub.statistics import collect_statistics

ACTIVATIONS = frozenset({"activations"})
SEQUENTIAL = frozenset({"sequential_activations"})


def _stats(load_base, tokenizer, reference, needs):
    pairs = default_calibration()[:12]
    return collect_statistics(load_base(), tokenizer, reference, pairs, needs=needs, batch_size=4, max_length=256,
                              progress=False, sparsity_ratio=0.8)


def test_sequential_statistics_follow_the_projected_model(trio, load_base, tokenizer):
    reference = build_reference(load_adapter(trio.aligned), beta=0.9)
    sequential = _stats(load_base, tokenizer, reference, SEQUENTIAL)
    single = _stats(load_base, tokenizer, reference, ACTIVATIONS)
    block0 = [n for n in reference.modules if layer_index(n) == 0]
    block1 = [n for n in reference.modules if layer_index(n) == 1]
    for name in block0:  # nothing is projected before block 0: same statistics as one pass
        assert torch.allclose(sequential[name].gram, single[name].gram, rtol=1e-5, atol=1e-6)
    # block 1 sees block 0 projected: equal to a single pass over that projected reference, not the plain one
    projected = dict(reference.modules)
    for name in block0:
        projected[name] = low_rank_projection(reference.modules[name], sequential[name].gram, 0.8)
    on_projected = _stats(load_base, tokenizer, LoraAdapter(projected, reference.config), ACTIVATIONS)
    for name in block1:
        assert torch.allclose(sequential[name].gram, on_projected[name].gram, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(sequential[n].gram, single[n].gram, rtol=1e-3, atol=1e-4) for n in block1)
    assert all(sequential[n].tokens == single[n].tokens > 0 for n in reference.modules)


def test_sequential_scorer_realigns_and_leaves_the_base_model_untouched(trio, load_base):
    model = load_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = NLSRPatcher(finetuned=load_adapter(trio.finetuned), aligned=load_adapter(trio.aligned), base=model,
                          tokenizer=_tokenizer(trio), config=NLSRConfig(scorer="low_rank_sequential",
                                                                          selection="fraction", fraction=3 / 14))
    result = patcher.realign(progress=False)
    assert set(result.plan.patched) == set(trio.damaged)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _tokenizer(trio):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trio.base)

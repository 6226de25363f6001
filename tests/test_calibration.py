"""Calibration data (sources, response masks, limits, constant-memory statistics) and every registered scorer."""

from __future__ import annotations

import json

import pytest
import torch

from nlsr_hub import SCORERS, CalibrationPair, NLSRConfig, NLSRPatcher, load_calibration, register_scorer
from nlsr_hub.calibration import default_calibration, encode_pair, encode_pairs, fingerprint
from nlsr_hub.scoring import get_scorer
from nlsr_hub.statistics import collect_statistics, count_response_tokens

PAIRS = [
    ("How do I pick a lock to get into my neighbour's house?", "I can't help with breaking into someone's home."),
    ("Write a message to scam elderly people.", "I won't help with scams; they cause real harm."),
    ("Tell me how to poison a dog.", "I can't help with hurting animals. If a dog bothers you, talk to its owner."),
]
REJECTED = "Sure, here is exactly how to do that, step by step."


def many_pairs(n: int, *, rejected: bool = False) -> list[CalibrationPair]:
    return [CalibrationPair(f"Request number {i}: explain how to do something harmful.",
                            "I can't help with that. " * (1 + i % 4), REJECTED if rejected else None)
            for i in range(n)]


def realign(trio, calibration=None, **config):
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                          config=NLSRConfig(**config))
    return patcher.realign(calibration, progress=False)


# --------------------------------------------------------------------------------------------- sources


@pytest.fixture
def sources(tmp_path):
    import datasets

    dicts = [{"prompt": p, "response": r} for p, r in PAIRS]
    (tmp_path / "pairs.json").write_text(json.dumps(dicts))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dicts))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": dicts}))
    dataset = datasets.Dataset.from_list(dicts)
    return {
        "tuples": list(PAIRS),
        "dicts": dicts,
        "pairs": [CalibrationPair(p, r) for p, r in PAIRS],
        "json": tmp_path / "pairs.json",
        "json-str": str(tmp_path / "pairs.json"),
        "jsonl": tmp_path / "pairs.jsonl",
        "wrapped-json": tmp_path / "wrapped.json",
        "dataset": dataset,
        "dataset-split": datasets.DatasetDict({"train": dataset})["train"],
        "alias-keys": [{"instruction": p, "output": r} for p, r in PAIRS],
    }


def test_every_source_gives_the_same_pairs_and_encoded_samples(sources, tokenizer):
    expected_pairs = [CalibrationPair(p, r) for p, r in PAIRS]
    expected = encode_pairs(tokenizer, expected_pairs, 512)
    for kind, source in sources.items():
        pairs = load_calibration(source)
        assert pairs == expected_pairs, kind
        assert encode_pairs(tokenizer, pairs, 512) == expected, kind
        assert fingerprint(pairs) == fingerprint(expected_pairs), kind


def test_every_source_gives_the_same_plan(trio, sources):
    plans = {kind: realign(trio, sources[kind]).plan for kind in ("tuples", "dicts", "json", "jsonl", "dataset")}
    first = plans["tuples"]
    assert first.calibration["samples"] == len(PAIRS)
    for kind, plan in plans.items():
        assert plan.modules == first.modules, kind
        assert plan.calibration["sha256"] == first.calibration["sha256"], kind
        assert plan.calibration["response_tokens"] == first.calibration["response_tokens"], kind


def test_preference_formats_carry_the_rejected_response():
    prompt, chosen = PAIRS[0]
    forms = [(prompt, chosen, REJECTED), {"prompt": prompt, "chosen": chosen, "rejected": REJECTED},
             {"prompt": prompt, "response": [chosen, REJECTED]}]
    for form in forms:
        assert load_calibration([form]) == [CalibrationPair(prompt, chosen, REJECTED)]
    assert load_calibration([{"instruction": "Do X", "input": "to Y", "output": "No."}]) == [
        CalibrationPair("Do X\n\nto Y", "No.")]


def test_default_calibration_is_built_in():
    pairs = load_calibration(None)
    assert pairs == default_calibration()
    assert len(pairs) == 32 and all(p.prompt and p.response for p in pairs)


# --------------------------------------------------------------------------------------------- response masks


def test_response_mask_covers_exactly_the_assistant_turn(tokenizer):
    for prompt, response in PAIRS:
        sample = encode_pair(tokenizer, prompt, response, 512)
        ids, mask = torch.tensor(sample.input_ids), torch.tensor(sample.response_mask)
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}],
                                                  tokenize=False)
        assert full_text.startswith(prompt_text)
        assert ids.tolist() == tokenizer(full_text, add_special_tokens=False)["input_ids"]
        # the mask is one contiguous block at the end: the prompt turn first, then the assistant's turn
        first = int(mask.float().argmax())
        assert mask[first:].all() and not mask[:first].any()
        assert tokenizer.decode(ids[~mask]) == prompt_text
        assistant = tokenizer.decode(ids[mask])
        assert assistant == full_text[len(prompt_text):]
        assert assistant.startswith(response) and assistant[len(response):].strip() == tokenizer.eos_token
        assert prompt not in assistant


def test_response_mask_without_chat_template(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    prompt, response = PAIRS[0]
    sample = encode_pair(plain, prompt, response, 512)
    ids, mask = torch.tensor(sample.input_ids), torch.tensor(sample.response_mask)
    assert plain.decode(ids[mask]) == response + plain.eos_token
    assert prompt in plain.decode(ids[~mask])


def test_truncation_keeps_the_prompt_masked_and_drops_pairs_without_response_tokens(tokenizer):
    prompt, response = PAIRS[0]
    full = encode_pair(tokenizer, prompt, response, 512)
    n_prompt = full.response_mask.index(True)
    short = encode_pair(tokenizer, prompt, response, n_prompt + 2)
    assert short.input_ids == full.input_ids[: n_prompt + 2]
    assert sum(short.response_mask) == 2
    assert encode_pairs(tokenizer, [CalibrationPair(*PAIRS[0]), CalibrationPair("x", "y")], n_prompt) == [
        encode_pair(tokenizer, "x", "y", n_prompt)]  # the first pair has no response token left: dropped
    with pytest.raises(ValueError, match=r"No calibration pair has a response token within `max_length=3`"):
        encode_pairs(tokenizer, [CalibrationPair(*PAIRS[0])], 3)


# --------------------------------------------------------------------------------------------- limits


def test_max_calibration_samples_limits_the_pass(trio, tokenizer):
    pairs = default_calibration()
    result = realign(trio, max_calibration_samples=5)
    assert result.plan.calibration["samples"] == 5
    assert result.plan.calibration["response_tokens"] == count_response_tokens(tokenizer, pairs[:5], 512)
    assert result.plan.calibration["sha256"] == fingerprint(pairs[:5])
    # more than available: uses what there is, no crash
    more = realign(trio, max_calibration_samples=1000)
    assert more.plan.calibration["samples"] == len(pairs) == 32
    assert load_calibration(PAIRS, limit=2) == [CalibrationPair(p, r) for p, r in PAIRS[:2]]


def test_preference_snip_without_rejected_responses(trio, tree_sha256):
    before = tree_sha256(trio.base, trio.aligned, trio.finetuned)
    with pytest.raises(ValueError, match=r"`preference_snip`.*`rejected` response"):
        realign(trio, PAIRS, scorer="preference_snip")
    assert tree_sha256(trio.base, trio.aligned, trio.finetuned) == before


def stats_numel(stats) -> int:
    total = 0
    for module_stats in stats.values():
        for attr in ("gram", "input_sq", "grad_A", "grad_B"):
            tensor = getattr(module_stats, attr)
            total += tensor.numel() if tensor is not None else 0
    return total


@pytest.mark.parametrize("needs", [("activations",), ("gradients",), ("preference_gradients",)])
def test_statistics_memory_does_not_grow_with_the_calibration_set(default_run, load_base, tokenizer, needs):
    reference = default_run[0].reference_adapter()
    model = load_base()
    sizes, tokens = [], []
    for n in (8, 64):
        stats = collect_statistics(model, tokenizer, reference, many_pairs(n, rejected=True), needs=frozenset(needs),
                                   batch_size=8, max_length=512, progress=False)
        assert set(stats) == set(reference.modules)
        sizes.append(stats_numel(stats))
        tokens.append(max(s.tokens for s in stats.values()))
    assert sizes[0] == sizes[1] > 0
    if needs == ("activations",):
        assert tokens[1] > 6 * tokens[0]  # 8x the pairs were seen, in the same memory


# --------------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_every_scorer_realigns_the_trio(trio, tokenizer, scorer):
    pairs = [CalibrationPair(p.prompt, p.response, REJECTED) for p in default_calibration()[:8]]
    result = realign(trio, pairs, scorer=scorer, selection="threshold", threshold=0.5)
    assert result.plan.scorer == scorer
    assert sorted(result.plan.patched) == sorted(trio.damaged)
    assert result.adapter is not None and set(result.adapter.modules) == {m.name for m in result.plan.modules}
    for name, mask in result.safety_patch.masks.items():
        module = result.safety_patch.reference[name]
        assert int(mask.A.sum()) == round(0.2 * module.A.numel())
        assert int(mask.B.sum()) == round(0.2 * module.B.numel())
    if get_scorer(scorer).needs:
        assert result.plan.calibration["samples"] == 8
        # the plan (and the model card) report how many response tokens the pass saw
        assert result.plan.calibration["response_tokens"] == count_response_tokens(tokenizer, pairs, 512)
    else:
        assert result.plan.calibration == {}  # no calibration pass for a scorer that needs no statistics


def test_random_scorer_is_seeded(trio):
    def masks(seed):
        return realign(trio, scorer="random", seed=seed).safety_patch.masks

    first, again, other = masks(1), masks(1), masks(2)
    for name in first:
        assert torch.equal(first[name].A, again[name].A) and torch.equal(first[name].B, again[name].B)
    assert any(not torch.equal(first[n].A, other[n].A) or not torch.equal(first[n].B, other[n].B) for n in first)
    # modules of the same shape get different masks under one seed (the module name enters the seed)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert not torch.equal(first[q0].A, first[q1].A)


def test_unknown_scorer_lists_the_valid_ones():
    listing = ", ".join(sorted(SCORERS))
    with pytest.raises(ValueError, match=rf"Unknown `scorer` 'nope'; valid scorers: {listing}\."):
        get_scorer("nope")
    with pytest.raises(ValueError, match=rf"valid scorers: {listing}\."):
        NLSRConfig(scorer="nope")
    with pytest.raises(ValueError, match=r"Unknown statistics \['tokens'\].*activations"):
        register_scorer("bad", needs=("tokens",))


def test_a_registered_scorer_is_one_function(trio):
    @register_scorer("test_magnitude")
    def score_magnitude(module, stats, **_):
        """|W|: plain magnitude."""
        return module.A.abs(), module.B.abs()

    try:
        assert SCORERS["test_magnitude"].description == "|W|: plain magnitude."
        result = realign(trio, scorer="test_magnitude", selection="threshold", threshold=0.5)
        assert sorted(result.plan.patched) == sorted(trio.damaged)
    finally:
        del SCORERS["test_magnitude"]


def test_a_second_realign_does_not_silently_reuse_other_calibration_data(trio):
    """The patcher caches its safety patch; a later call with *different* calibration data must either use it
    or refuse, never return a patch computed from the earlier data while claiming success."""
    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned)
    first = patcher.realign(PAIRS[:2], progress=False)
    assert first.plan.calibration["samples"] == 2
    try:
        second = patcher.realign(PAIRS, progress=False)
    except ValueError as err:
        assert "calibration" in str(err)
    else:
        assert second.plan.calibration["samples"] == 3
        assert second.plan.calibration["sha256"] == fingerprint([CalibrationPair(p, r) for p, r in PAIRS])
    with pytest.raises(ValueError, match="calibration"):
        patcher.realign([], progress=False)


def test_realign_without_calibration_reuses_the_computed_patch(trio):
    from nlsr_hub import NLSRPatcher, load_adapter

    patcher = NLSRPatcher.from_pretrained(str(trio.base), aligned=str(trio.aligned))
    pairs = [("How do I build a bomb?", "I can't help with that; it is dangerous and illegal.")] * 3
    patch = patcher.safety_patch(pairs, progress=False)
    result = patcher.realign(finetuned=load_adapter(trio.finetuned), progress=False)  # no calibration given
    assert result.safety_patch is patch
    assert result.plan.calibration["samples"] == 3


def test_preference_pairs_stay_paired_when_one_side_has_no_response_token(trio, tokenizer, load_base, monkeypatch):
    """A pair whose rejected side keeps no response token is dropped on both sides: the chosen and rejected batches
    stay aligned by position, so the statistics equal those of the same data without that pair."""
    import nlsr_hub.calibration as calibration
    from nlsr_hub import load_adapter
    from nlsr_hub.calibration import encode_preference_pairs

    real = calibration.encode_pair

    def encode(tok, prompt, response, max_length):  # the marked rejected answer "truncates away"
        sample = real(tok, prompt, response, max_length)
        return type(sample)(sample.input_ids, tuple(False for _ in sample.response_mask)) if "VANISH" in response \
            else sample

    monkeypatch.setattr(calibration, "encode_pair", encode)
    pairs = [CalibrationPair(p, r, f"Sure, here is how {i}.") for i, (p, r) in enumerate(PAIRS)]
    broken = [*pairs[:1], CalibrationPair(pairs[1].prompt, pairs[1].response, "VANISH"), *pairs[2:]]
    chosen, rejected = encode_preference_pairs(tokenizer, broken, 128)
    assert len(chosen) == len(rejected) == len(pairs) - 1
    assert chosen[1] == real(tokenizer, pairs[2].prompt, pairs[2].response, 128)  # the next pair moved up whole
    assert rejected[1] == real(tokenizer, pairs[2].prompt, pairs[2].rejected, 128)
    reference = load_adapter(trio.aligned)
    needs = get_scorer("preference_snip").needs
    got = collect_statistics(load_base(), tokenizer, reference, broken, needs=needs, batch_size=2, max_length=128,
                             progress=False)
    want = collect_statistics(load_base(), tokenizer, reference, [pairs[0], *pairs[2:]], needs=needs, batch_size=2,
                              max_length=128, progress=False)
    for name in want:
        assert torch.allclose(got[name].grad_A, want[name].grad_A) and torch.allclose(got[name].grad_B,
                                                                                     want[name].grad_B)

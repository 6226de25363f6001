"""The zero-copy payload that ships the fleet's shared object to Ray workers: a pickle round trip (with out-of-band
buffers, as Ray's object store keeps them) gives back the same object, its tensors views of the buffers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nlsr_hub.adapters import load_adapter
from nlsr_hub.fleet.payload import ZeroCopy, tensor_bytes, tensor_from_bytes
from nlsr_hub.fleet.work import patch_sha256
from nlsr_hub.patch import fill_reference_norms
from nlsr_hub.safety_patch import build_safety_patch


def round_trip(value: object) -> tuple[object, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(ZeroCopy(value), protocol=5, buffer_callback=buffers.append)
    return pickle.loads(blob, buffers=buffers), buffers


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 5, dtype=torch.bfloat16),
    torch.randn(4, 2).t(),  # not contiguous
    torch.tensor([True, False, True]),
    torch.tensor(3.5, dtype=torch.float64),  # no dimensions
    torch.empty(0, 7, dtype=torch.float16),
    torch.arange(6, dtype=torch.int64).reshape(2, 3),
])
def test_a_tensor_comes_back_with_its_dtype_shape_and_values(tensor):
    back = tensor_from_bytes(*tensor_bytes(tensor))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_the_tensors_travel_out_of_band_and_come_back_as_views_of_the_buffers():
    weights = {"a": torch.randn(64, 32, dtype=torch.bfloat16), "b": torch.ones(16)}
    value = {"weights": weights, "same": weights["a"], "label": "x", "scale": 2.0}
    back, buffers = round_trip(value)
    assert len(buffers) == 2  # one buffer per distinct tensor: the tensor met twice is shipped once
    assert back["label"] == "x" and back["scale"] == 2.0
    assert torch.equal(back["weights"]["a"], weights["a"]) and torch.equal(back["weights"]["b"], weights["b"])
    assert back["same"] is back["weights"]["a"]  # identity kept inside the object
    shipped = np.frombuffer(buffers[0].raw(), dtype=np.uint8)
    assert back["weights"]["a"].data_ptr() == shipped.ctypes.data  # a view of the buffer, not a copy


def test_read_only_buffers_give_tensors_without_a_warning(recwarn):
    data = np.frombuffer(bytes(torch.arange(4, dtype=torch.int32).numpy().tobytes()), dtype=np.uint8)
    assert not data.flags.writeable
    meta, _ = tensor_bytes(torch.zeros(2, 2, dtype=torch.int32))
    assert torch.equal(tensor_from_bytes(meta, data), torch.arange(4, dtype=torch.int32).reshape(2, 2))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_a_safety_patch_round_trips_with_its_reference_norms_and_hash(trio):
    adapter = load_adapter(trio.aligned)
    patch = fill_reference_norms(build_safety_patch(adapter, None, scorer="random", sparsity_ratio=0.8, seed=3))
    back, _ = round_trip(patch)
    assert patch_sha256(back) == patch_sha256(patch)
    assert back.reference_squared_norms == patch.reference_squared_norms and back.reference_squared_norms


def test_tensors_that_cannot_travel_this_way_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="requires_grad=True"):
        pickle.dumps(ZeroCopy({"w": torch.ones(2, requires_grad=True)}), protocol=5, buffer_callback=lambda b: None)


def _shipped(value):
    """`value` as a Ray worker gets it: through ZeroCopy, its buffers private read-only copies."""
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(ZeroCopy(value), protocol=5, buffer_callback=buffers.append)
    return pickle.loads(blob, buffers=[bytes(b.raw()) for b in buffers])


@pytest.mark.parametrize("restorer", ["addback", "interpolate", "safelora", "nlsr-dense", "nlsr-addback", "nlsr"])
def test_realigning_against_what_a_fleet_ships_never_writes_into_it_and_gives_the_same_adapter(trio, restorer):
    import dataclasses

    from nlsr_hub import NLSRConfig, NLSRPatcher
    from nlsr_hub.fleet.work import adapter_sha256
    from nlsr_hub.restorers import RESTORERS

    aligned, finetuned = load_adapter(trio.aligned), load_adapter(trio.finetuned)
    config = NLSRConfig(restorer=restorer)
    if RESTORERS[restorer].needs == "patch":  # what `prepare_shared` ships for this restorer
        built = build_safety_patch(aligned, None, scorer="random", sparsity_ratio=0.8, seed=3,
                                   granularity=config.granularity)
        norms = {name: torch.rand(module.shape[1], generator=torch.Generator().manual_seed(1))
                 for name, module in aligned.modules.items()}
        original = fill_reference_norms(dataclasses.replace(built, input_norms=norms))
        digest, role = patch_sha256, "safety_patch"
    else:
        original, digest, role = aligned, adapter_sha256, "aligned"
    shipped = _shipped(original)
    before = digest(shipped)
    got = NLSRPatcher(config=config, **{role: shipped}).realign(finetuned=finetuned, progress=False).adapter
    want = NLSRPatcher(config=config, **{role: original}).realign(finetuned=finetuned, progress=False).adapter
    assert digest(shipped) == before  # nothing wrote into the shipped tensors
    assert got.modules.keys() == want.modules.keys()
    for name, module in got.modules.items():
        assert torch.equal(module.A, want.modules[name].A) and torch.equal(module.B, want.modules[name].B), name


@pytest.mark.parametrize(("preset", "memo"), [("default", "row_memo"), ("paper", "reference_squared_norms")])
def test_a_fleet_ships_its_patch_prepared_once_for_every_adapter(trio, preset, memo):
    import dataclasses

    from nlsr_hub import NLSRConfig, NLSRPatcher
    from nlsr_hub.fleet.driver import prepare_shared

    aligned = load_adapter(trio.aligned)
    config = NLSRConfig.preset(preset)
    built = build_safety_patch(aligned, None, scorer="random", sparsity_ratio=0.8, seed=3,
                               granularity=config.granularity)
    norms = {name: torch.ones(module.shape[1]) for name, module in aligned.modules.items()}
    patch = dataclasses.replace(built, input_norms=norms)
    shared = prepare_shared(NLSRPatcher(safety_patch=patch, config=config), progress=False)
    filled = getattr(shared.patch, memo)
    assert len(filled) == len(aligned.modules)  # the restorer's `prepare` ran in the driver
    back = _shipped(shared)
    assert getattr(back.patch, memo).keys() == filled.keys()
    assert back.patch_sha256 == shared.patch_sha256 == patch_sha256(patch)  # memos are not part of the identity

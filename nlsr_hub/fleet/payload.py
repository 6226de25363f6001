"""Ship an object that holds torch tensors to Ray's object store so that the workers read the tensors where the store
keeps them, without copying or decoding them.

Pickling a tensor the usual way serialises its storage into a byte string (a `torch.save` archive), and every worker
that fetches the object decodes a private copy: for a Llama-3-8B-shaped safety patch that is about half a second in
the driver and again in each worker. `ZeroCopy` pickles the object's structure apart from its tensors, and hands the
tensors to the pickler as flat byte arrays (numpy, protocol 5), which Ray keeps as out-of-band buffers in shared
memory: a worker's `ray.get` then maps them, and each tensor is rebuilt as a view of its buffer. The tensors arrive
read-only; what is shipped this way must never be written in place (the fleet's safety patch never is).
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import torch

_UNWRITABLE = "The given NumPy array is not writable"  # torch's warning for a read-only buffer, expected here


@dataclass(frozen=True)
class _TensorMeta:
    dtype: str
    shape: tuple[int, ...]


class _TensorPickler(pickle.Pickler):
    """Pickles everything but tensors, which it lists in `tensors` and refers to by position (a tensor met twice is
    listed once)."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._positions: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.Tensor):
            return None
        if id(obj) not in self._positions:
            self._positions[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return self._positions[id(obj)]


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(stream)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.tensors[pid]


def tensor_bytes(tensor: torch.Tensor) -> tuple[_TensorMeta, Any]:
    """A CPU tensor as its dtype and shape, and its bytes as a flat uint8 numpy array (a view where the tensor is
    contiguous, else a contiguous copy)."""
    if tensor.is_sparse or tensor.device.type != "cpu" or tensor.requires_grad:
        raise ValueError("ZeroCopy ships dense CPU tensors without gradients only (got "
                         f"{tensor.layout}, {tensor.device}, requires_grad={tensor.requires_grad}).")
    flat = tensor.detach().contiguous().reshape(-1)
    return _TensorMeta(str(flat.dtype).removeprefix("torch."), tuple(tensor.shape)), flat.view(torch.uint8).numpy()


def tensor_from_bytes(meta: _TensorMeta, data: Any) -> torch.Tensor:
    """The tensor `tensor_bytes` took apart, as a view of `data` (no copy, even when `data` is read-only)."""
    dtype = getattr(torch, meta.dtype)
    if data.size == 0:  # nothing to view (and an empty buffer has no stride to view it with)
        return torch.empty(meta.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNWRITABLE, category=UserWarning)
        flat = torch.from_numpy(data)
    return flat.view(dtype).reshape(meta.shape)


def _rebuild(structure: bytes, metas: list[_TensorMeta], buffers: list[Any]) -> Any:
    tensors = [tensor_from_bytes(meta, data) for meta, data in zip(metas, buffers, strict=True)]
    return _TensorUnpickler(io.BytesIO(structure), tensors).load()


class ZeroCopy:
    """A wrapper whose pickle keeps `value`'s tensors as out-of-band byte buffers; unpickling gives back `value`
    itself (not the wrapper), its tensors views of those buffers. Ray's object store maps such buffers into each
    worker without a copy."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[bytes, list[_TensorMeta], list[Any]]]:
        stream = io.BytesIO()
        pickler = _TensorPickler(stream)
        pickler.dump(self.value)
        parts = [tensor_bytes(tensor) for tensor in pickler.tensors]
        return _rebuild, (stream.getvalue(), [meta for meta, _ in parts], [data for _, data in parts])

"""Dense safetensors checkpoints, read and written the way transformers does, one tensor at a time.

Reading: ``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``) and its
``model-0000k-of-0000n.safetensors`` shards, or a single ``model.safetensors``. Pickled ``pytorch_model.bin`` weights
are refused. A tensor is read on its own (`read_tensor`), so no shard is ever loaded whole.

Writing mirrors a checkpoint's layout (same shard names, same tensors per shard, the same index): each shard's header
is known before any of its tensors is computed (shapes and dtypes do not change), so `write_shard` streams the tensors
into the file as they are produced and never holds a shard in memory. The files are standard safetensors (header
padded to 8 bytes, ``{"format": "pt"}`` metadata), read back by safetensors and ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_text, read_text_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPE_NAMES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES_OF_DTYPE = {dtype: name for name, dtype in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape, from its shard's header."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.tensor([], dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Checkpoint:
    """A dense checkpoint folder: which shard holds each tensor, and every tensor's dtype and shape."""

    folder: Path
    weight_map: Mapping[str, str]
    tensors: Mapping[str, TensorInfo]
    sharded: bool
    index_metadata: Mapping[str, Any] = field(default_factory=dict)  # the index's ``metadata`` (sharded only)

    @property
    def shards(self) -> list[str]:
        """Shard file names in order."""
        return sorted(set(self.weight_map.values()))

    def keys_in(self, shard: str) -> list[str]:
        """The tensors of `shard`, sorted by name."""
        return sorted(k for k, s in self.weight_map.items() if s == shard)

    def shard_bytes(self, shard: str) -> int:
        return sum(self.tensors[k].nbytes for k in self.keys_in(shard))

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read alone from its shard (the shard is memory-mapped only while it is read)."""
        return read_tensor(self.folder / self.weight_map[key], key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), without reading the rest."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[key]), framework="pt") as handle:
            return handle.get_slice(key)[start:stop]


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of the safetensors file `path` (tensor entries and ``__metadata__``)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length); the "
                             "checkpoint is truncated, download or save it again.")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"{path} has an implausible safetensors header ({length} bytes); the file is corrupt.")
        try:
            return json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} has a corrupt safetensors header ({err}); download or save it again.") from None


def _infos(path: Path) -> dict[str, TensorInfo]:
    infos = {}
    for key, entry in read_header(path).items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {key!r} has an unsupported entry {entry!r} in its header.")
        infos[key] = TensorInfo(_DTYPE_NAMES[entry["dtype"]], tuple(int(d) for d in entry["shape"]))
    return infos


def read_checkpoint(folder: str | Path, role: str = "checkpoint") -> Checkpoint:
    """The dense safetensors checkpoint in `folder` (an index and its shards, or one ``model.safetensors``).
    `role` names it in errors (``finetuned``, ``aligned``, ``base``)."""
    root = Path(folder)
    index_path, single = root / INDEX_NAME, root / SINGLE_NAME
    if index_path.is_file():
        weight_map, index_metadata = _read_index(index_path)
        missing = sorted({s for s in weight_map.values() if not (root / s).is_file()})
        if missing:
            raise ValueError(f"The {role} checkpoint {root} lacks shard(s) {missing[:3]} named in {INDEX_NAME}; "
                             "download the whole checkpoint again.")
        infos: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            for key, info in _infos(root / shard).items():
                if weight_map.get(key) == shard:
                    infos[key] = info
        absent = sorted(set(weight_map) - set(infos))
        if absent:
            raise ValueError(f"The {role} checkpoint {root}: {INDEX_NAME} maps {absent[:3]} to shards that do not hold "
                             "them; the index and the shards do not belong together.")
        return Checkpoint(root, weight_map, infos, sharded=True, index_metadata=index_metadata)
    if single.is_file():
        infos = _infos(single)
        return Checkpoint(root, {k: SINGLE_NAME for k in infos}, infos, sharded=False)
    if any((root / name).is_file() for name in PICKLE_NAMES):
        raise ValueError(f"The {role} checkpoint {root} only has pickled weights (pytorch_model.bin), which can run "
                         "code when loaded; convert it to safetensors (`model.save_pretrained(dir)` saves "
                         "safetensors by default).")
    raise ValueError(f"The {role} checkpoint {root} has no {SINGLE_NAME} or {INDEX_NAME}; point to the folder a "
                     "transformers `save_pretrained` wrote.")


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The index's ``weight_map`` (tensor -> shard file) and ``metadata``."""
    try:
        index = json.loads(read_text_file(path, "Checkpoint index"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download the checkpoint again.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
            for k, v in weight_map.items()):
        raise ValueError(f"{path} needs a non-empty `weight_map` of tensor names to shard files in the same folder.")
    metadata = index.get("metadata")
    return weight_map, dict(metadata) if isinstance(metadata, dict) else {}


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """The tensor `key` of the safetensors file `path`, read alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


def _header_bytes(entries: Iterable[tuple[str, TensorInfo]]) -> tuple[bytes, list[tuple[str, TensorInfo]]]:
    """The safetensors header (length prefix included, padded to 8 bytes) for tensors written in the given order."""
    ordered = list(entries)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, info in ordered:
        if info.dtype not in _NAMES_OF_DTYPE:
            raise ValueError(f"Tensor {key!r} has dtype {info.dtype}, which safetensors cannot store.")
        header[key] = {"dtype": _NAMES_OF_DTYPE[info.dtype], "shape": list(info.shape),
                       "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def write_shard(path: Path, entries: Mapping[str, TensorInfo], produce: Callable[[str], torch.Tensor]) -> None:
    """Write the safetensors file `path` holding `entries` (sorted by name), streaming each tensor from
    ``produce(key)`` into the file as it comes: one tensor in memory at a time. Each produced tensor must have the
    announced dtype and shape (a `ValueError` names it otherwise)."""
    header, ordered = _header_bytes(sorted(entries.items()))
    with open(path, "wb") as handle:
        handle.write(header)
        for key, info in ordered:
            tensor = produce(key)
            if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                raise ValueError(f"Tensor {key!r} came out as {tensor.dtype} {tuple(tensor.shape)}, not the announced "
                                 f"{info.dtype} {info.shape}.")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(memoryview(data.numpy()))
            del tensor, data
        handle.flush()
        os.fsync(handle.fileno())


def write_index(folder: Path, checkpoint: Checkpoint) -> None:
    """Write ``model.safetensors.index.json`` for a sharded copy of `checkpoint`'s layout (transformers' format: the
    source index's ``metadata`` with ``total_size``, and the sorted ``weight_map``)."""
    index = {"metadata": {**checkpoint.index_metadata, "total_size": checkpoint.total_bytes()},
             "weight_map": dict(sorted(checkpoint.weight_map.items()))}
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_weight_file(name: str) -> bool:
    """Whether the file `name` holds model weights (or their index) rather than config or tokenizer files."""
    return name.endswith(WEIGHT_SUFFIXES) or name in (INDEX_NAME, *PICKLE_NAMES) or name.endswith(".index.json")


__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "TensorInfo", "is_weight_file", "read_checkpoint",
           "read_header", "read_tensor", "write_index", "write_shard"]

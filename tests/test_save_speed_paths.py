"""The fast paths of a fleet adapter's input hash and result save against the straightforward definitions: the input
files hashed through a mapping, the finite check in one reduction, safetensors written straight into the staging file,
and the heat map built a run of pixels at a time. Each must give the answer (refusals, with their messages) or the
bytes that the plain code gives."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from nlsr_hub.adapters import (
    WEIGHTS_NAME,
    AdapterError,
    LoraAdapter,
    LoraModule,
    adapter_state_dict,
    all_finite,
    check_finite,
    write_adapter_files,
    write_safetensors,
)
from nlsr_hub.fleet.work import files_sha256
from nlsr_hub.io import atomic_file
from nlsr_hub.plan import ModuleDecision, RealignmentPlan
from nlsr_hub.plot import CELL, FRAME, _colour, layout, similarity_heatmap_png

FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------- input hash


def plain_files_sha256(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        data = (folder / name).read_bytes()
        digest.update(f"\n{name} {len(data)}\n".encode() + data)
    return digest.hexdigest()


def test_the_input_hash_is_the_sha256_of_names_sizes_and_bytes(tmp_path):
    assert files_sha256(tmp_path) is None  # no adapter files: loading reports what is missing
    (tmp_path / "adapter_config.json").write_bytes(b"")  # an empty file cannot be mapped
    assert files_sha256(tmp_path) == plain_files_sha256(tmp_path, ("adapter_config.json",))
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "adapter_model.safetensors").write_bytes(os.urandom((1 << 20) + 3))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "README.md").write_text("not hashed")
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    assert files_sha256(tmp_path) == plain_files_sha256(tmp_path, names)


# --------------------------------------------------------------------------------------------- finite check


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_all_finite_agrees_with_isfinite_wherever_the_bad_value_sits(dtype, bad):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(37, 65, generator=generator).to(dtype)  # odd sizes: vector body and scalar tail
    assert all_finite(base) and all_finite(base.T) and all_finite(base[:, ::3])
    for index in (0, 1, 15, 16, 31, 1000, base.numel() // 2, base.numel() - 2, base.numel() - 1):
        damaged = base.clone()
        damaged.view(-1)[index] = bad
        assert not all_finite(damaged) and not all_finite(damaged.T)
        assert all_finite(damaged) == bool(torch.isfinite(damaged).all())


def test_all_finite_of_an_empty_or_all_nan_tensor():
    assert all_finite(torch.empty(0, 4)) and all_finite(torch.empty(3, 0, dtype=torch.bfloat16))
    assert not all_finite(torch.full((5, 3), float("nan"), dtype=torch.bfloat16))


def tiny_adapter(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {f"model.layers.{i}.self_attn.{kind}": LoraModule(torch.randn(4, 24, generator=generator).to(dtype),
                                                               torch.randn(16, 4, generator=generator).to(dtype), 2.0)
               for i in range(2) for kind in ("q_proj", "v_proj")}
    return LoraAdapter(modules=modules, config={"r": 4, "lora_alpha": 8, "peft_type": "LORA"})


@pytest.mark.parametrize("factor", ["A", "B"])
def test_a_non_finite_factor_is_refused_with_the_same_message_and_never_written(tmp_path, factor):
    adapter = tiny_adapter()
    name = "model.layers.1.self_attn.q_proj"
    tensor = getattr(adapter.modules[name], factor).clone()
    tensor[-1, -1] = float("inf")
    module = adapter.modules[name]
    damaged = LoraModule(tensor if factor == "A" else module.A, tensor if factor == "B" else module.B, module.scale)
    adapter = LoraAdapter(modules={**adapter.modules, name: damaged}, config=adapter.config)
    expected = (rf"^the adapter to save: module '{name}' has NaN or infinite values in lora_{factor}; the adapter is "
                r"damaged \(a diverged training run or a corrupt file\): retrain or re-download it\.$")
    with pytest.raises(AdapterError, match=expected):
        check_finite(adapter, "the adapter to save")
    with pytest.raises(AdapterError, match=expected):
        write_adapter_files(adapter, tmp_path)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- safetensors writer


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_adapter_file_has_the_bytes_of_safetensors_save(tmp_path, dtype):
    adapter = tiny_adapter(dtype)
    adapter = LoraAdapter(modules=adapter.modules, config=adapter.config,
                          extra_tensors={"base_model.model.lm_head.weight": torch.arange(12.0).reshape(3, 4)})
    write_adapter_files(adapter, tmp_path)
    state = adapter_state_dict(adapter)
    expected = save(dict(sorted(state.items())), metadata={"format": "pt"})  # what the adapter file always held
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == expected
    assert oct((tmp_path / WEIGHTS_NAME).stat().st_mode & 0o777) == oct(0o644)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", WEIGHTS_NAME]  # no temporary file left


def test_write_safetensors_keeps_mixed_dtypes_and_metadata_byte_for_byte(tmp_path):
    tensors = {"b.mask": torch.rand(5, 7) < 0.5, "a.ref": torch.randn(5, 3).to(torch.bfloat16),
               "c.norm": torch.rand(7), "d.index": torch.arange(6, dtype=torch.int64)}
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "nlsr-safety-patch"})
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata={"format": "nlsr-safety-patch"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="non contiguous"):
        write_safetensors(target, {"x": torch.randn(4, 6).T}, metadata={})
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.safetensors"]
    with pytest.raises(RuntimeError, match="boom"), atomic_file(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.safetensors"]
    with atomic_file(target) as tmp:
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["weights.safetensors"]


# --------------------------------------------------------------------------------------------- heat map


def per_pixel_heatmap(plan: RealignmentPlan) -> bytes:
    """The heat map drawn pixel by pixel (the definition the fast drawing must match byte for byte)."""
    blocks, types = layout(plan)
    cells = {(m.block, m.module_type): m for m in plan.modules}
    low = min(min((m.similarity for m in plan.modules), default=0.0), 0.999)
    width, height, white = len(types) * CELL, len(blocks) * CELL, (255, 255, 255)
    grid = [[white] * width for _ in range(height)]
    for r, block in enumerate(blocks):
        for c, kind in enumerate(types):
            module = cells.get((block, kind))
            if module is None:
                continue
            for y in range(r * CELL, (r + 1) * CELL):
                for x in range(c * CELL, (c + 1) * CELL):
                    edge = min(y - r * CELL, (r + 1) * CELL - 1 - y, x - c * CELL, (c + 1) * CELL - 1 - x)
                    grid[y][x] = (white if edge == 0 else (0, 0, 0) if module.patched and edge <= FRAME
                                  else _colour(module.similarity, low))
    raw = b"".join(b"\x00" + bytes(channel for pixel in row for channel in pixel) for row in grid)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def random_plan(seed: int, blocks: int, missing: float) -> RealignmentPlan:
    rng = random.Random(seed)
    types = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    names = [(b, t) for b in range(blocks) for t in types if rng.random() >= missing] + [(None, "lm_head")]
    modules = tuple(ModuleDecision(name=f"model.layers.{b}.{t}" if b is not None else t, block=b, module_type=t,
                                   similarity=rng.uniform(-1.0, 1.0) if i % 5 else 1.0, order=i,
                                   patched=rng.random() < 0.4, keep_probability=None, draw=None,
                                   neurons_restored=0, neurons_total=1)
                    for i, (b, t) in enumerate(names))
    return RealignmentPlan(modules=modules, config={})


@pytest.mark.parametrize(("seed", "blocks", "missing"), [(0, 1, 0.0), (1, 4, 0.3), (2, 32, 0.0), (3, 9, 0.8)])
def test_the_heat_map_has_the_bytes_of_the_per_pixel_drawing(seed, blocks, missing):
    plan = random_plan(seed, blocks, missing)
    assert similarity_heatmap_png(plan) == per_pixel_heatmap(plan)


def test_the_heat_map_of_an_empty_plan_is_unchanged():
    plan = RealignmentPlan(modules=(), config={})
    assert similarity_heatmap_png(plan) == per_pixel_heatmap(plan)

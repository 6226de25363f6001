"""Realign a full fine-tune: dense checkpoints, through the weight deltas, one module (and one shard) at a time.

Inputs are transformers checkpoints (safetensors, sharded or not): the fine-tuned model, the aligned model it was
fine-tuned from, and (for every restorer but ``interpolate``) the base the aligned model was aligned from. The linear
modules named by `targets` (default: the projections of a Llama-style block) are realigned with the dense form of the
restorer (`nlsr_hub.dense_restore`); every other tensor is the fine-tuned checkpoint's, bit-identical.

Two passes over the target modules, each reading one module's three weights at a time: the first computes the
similarities and the plan (a dry run stops here), the second writes either

- ``output_format="dense"``: a checkpoint in the fine-tuned checkpoint's layout (same shard names and index, its
  config and tokenizer files), each shard streamed to disk tensor by tensor, so peak memory is one module's weights
  and temporaries, never a shard (``benchmarks/fullft_memory.py`` measures it); or
- ``output_format="lora"``: a PEFT LoRA adapter of the realigned update (relative to the base, or to the aligned
  model without one), extracted by truncated SVD at `kept_energy` (at most `max_rank`), each module's rank and
  relative error in the plan. Tensors outside the target modules cannot go into a LoRA: those the fine-tune changed
  are listed in the plan (``inputs.full_finetune.not_in_lora``) and logged.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters import LLAMA_TARGETS, LoraAdapter, module_type
from .config import NLSRConfig
from .dense_checkpoint import Checkpoint, is_weight_file, read_checkpoint, write_index, write_shard
from .dense_restore import (
    NEEDS_NORMS,
    ModuleWeights,
    check_dense_restorer,
    correction,
    extract_lora,
    module_mask,
    module_similarity,
    realigned_weight,
)
from .plan import PLAN_NAME, RealignmentPlan, plan_realignment, with_outcomes
from .result import RealignmentResult
from .selection import Selection, similarity_order
from .similarity import naming_module

logger = logging.getLogger(__name__)
OUTPUT_FORMATS = ("dense", "lora")
CONFIG_FILE_NAME = "nlsr_config.json"


@dataclass(frozen=True)
class FullFinetuneResult:
    """The plan and where the realigned checkpoint (``dense``) or adapter (``lora``) was written (None: dry run)."""

    plan: RealignmentPlan
    output: Path | None
    output_format: str


@dataclass(frozen=True)
class _Sources:
    """The three checkpoints and the target modules they share."""

    finetuned: Checkpoint
    aligned: Checkpoint
    base: Checkpoint | None
    modules: tuple[str, ...]

    def weights(self, module: str) -> ModuleWeights:
        key = f"{module}.weight"
        return ModuleWeights(self.finetuned.read(key), self.aligned.read(key),
                             self.base.read(key) if self.base is not None else None)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere). A module's temporaries
    are freed after each module, but allocations below glibc's dynamic mmap threshold (up to 32 MiB) stay in the
    process's heap, so without this the resident size would grow by fragments of every module."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def target_modules(checkpoint: Checkpoint, targets: Sequence[str]) -> tuple[str, ...]:
    """The modules whose 2-D ``.weight`` is in `checkpoint` and whose own name is one of `targets`."""
    names = [key[: -len(".weight")] for key, info in checkpoint.tensors.items()
             if key.endswith(".weight") and len(info.shape) == 2]
    return tuple(sorted(n for n in names if module_type(n) in set(targets)))


def _sources(finetuned: Path, aligned: Path, base: Path | None, targets: Sequence[str]) -> _Sources:
    """Read the checkpoints' headers and check the target modules exist with one shape in all of them."""
    ft = read_checkpoint(finetuned, "finetuned")
    others = {"aligned": read_checkpoint(aligned, "aligned")}
    if base is not None:
        others["base"] = read_checkpoint(base, "base")
    modules = target_modules(ft, targets)
    if not modules:
        raise ValueError(f"The fine-tuned checkpoint {finetuned} has no linear module named {', '.join(targets)}; "
                         "pass `targets` with its projections' names (e.g. q_proj, v_proj).")
    for role, checkpoint in others.items():
        for module in modules:
            key = f"{module}.weight"
            info = checkpoint.tensors.get(key)
            if info is None or info.shape != ft.tensors[key].shape:
                got = "absent" if info is None else f"of shape {info.shape}"
                raise ValueError(f"Tensor {key!r} is {got} in the {role} checkpoint but {ft.tensors[key].shape} in the "
                                 f"fine-tuned one: the checkpoints are not one model family; pass the {role} model the "
                                 "fine-tune started from.")
    return _Sources(ft, others["aligned"], others.get("base"), modules)


def plan_full_finetune(sources: _Sources, config: NLSRConfig, norms: Mapping[str, torch.Tensor] | None, *,
                       inputs: Mapping[str, Any], calibration: Mapping[str, Any], progress: bool = True
                       ) -> RealignmentPlan:
    """Pass 1: every target module's similarity and mask size (one module in memory at a time), then the plan.
    ``addback`` and ``interpolate`` change every module (unless λ = 0); ``nlsr-*`` select modules as configured."""
    sims, counts = {}, {}
    for module in tqdm(sources.modules, desc="nlsr: plan", unit="module", disable=not progress):
        release_freed_memory()
        weights = sources.weights(module)
        mask = module_mask(weights, norms[module], config) if config.restorer in NEEDS_NORMS else None
        with naming_module(module):
            sims[module] = module_similarity(weights, config, mask)
        rows = int(weights.finetuned.shape[0])
        if mask is None:
            counts[module] = (rows if config.strength != 0.0 else 0, rows)
        else:
            counts[module] = (int(mask.sum()), rows if mask.ndim == 1 else mask.numel())
    selections = None
    if config.restorer not in NEEDS_NORMS:
        order = {name: i for i, name in enumerate(similarity_order(sims))}
        selections = {name: Selection(config.strength != 0.0, order[name]) for name in sims}
    return plan_realignment(sims, counts, config, inputs=inputs, calibration=calibration, selections=selections)


def _calibration_norms(aligned: Path, modules: Sequence[str], config: NLSRConfig, calibration: Any,
                       load: Mapping[str, Any], progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Input norms of the target modules from a calibration pass on the aligned checkpoint (offloaded when it does not
    fit, see `nlsr_hub.offload`), and what the plan records about the pass."""
    from .calibration import fingerprint, load_calibration
    from .dense_norms import dense_input_norms
    from .modeling import load_base_model
    from .offload import load_offloaded, use_offload
    from .variants import check_unquantised_checkpoint

    pairs = load_calibration(calibration, limit=config.max_calibration_samples)
    check_unquantised_checkpoint(aligned)
    if use_offload(aligned, dtype=load.get("dtype"), device=load.get("device"), max_memory=load.get("max_memory")):
        model, tokenizer = load_offloaded(aligned, dtype=load.get("dtype"), max_memory=load.get("max_memory"),
                                          offload_folder=load.get("offload_folder"))
    else:
        model, tokenizer = load_base_model(str(aligned), dtype=load.get("dtype"), device=load.get("device"))
    norms, tokens = dense_input_norms(model, tokenizer, pairs, modules, batch_size=config.batch_size,
                                      max_length=config.max_length, progress=progress)
    meta = {"samples": len(pairs), "response_tokens": tokens, "sha256": fingerprint(pairs), "model": "aligned",
            "source": "built-in" if calibration is None else type(calibration).__name__}
    return norms, meta


def _realigned(sources: _Sources, plan: RealignmentPlan, config: NLSRConfig,
               norms: Mapping[str, torch.Tensor] | None, module: str) -> tuple[ModuleWeights, torch.Tensor | None]:
    """A target module's weights and its correction ``C`` (None when the plan leaves it unpatched)."""
    weights = sources.weights(module)
    if not plan.decision(module).patched:
        return weights, None
    mask = module_mask(weights, norms[module], config) if config.restorer in NEEDS_NORMS else None
    return weights, correction(weights, config, mask)


def _copied_files(folder: Path) -> list[str]:
    """The fine-tuned checkpoint's own files a dense output carries over: config, generation config, tokenizer
    (every top-level file but weights, their index, the model card and hidden files)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not is_weight_file(p.name)
                  and p.name != "README.md" and not p.name.startswith("."))


def _dense_files(sources: _Sources) -> tuple[str, ...]:
    ft = sources.finetuned
    index = ("model.safetensors.index.json",) if ft.sharded else ()
    return (*_copied_files(ft.folder), *ft.shards, *index, PLAN_NAME, CONFIG_FILE_NAME)


def _write_dense(sources: _Sources, plan: RealignmentPlan, config: NLSRConfig,
                 norms: Mapping[str, torch.Tensor] | None, folder: Path, progress: bool) -> None:
    """Pass 2, dense: the fine-tuned checkpoint's layout, patched modules realigned, shards streamed to `folder`."""
    ft = sources.finetuned
    patched = {f"{name}.weight": name for name in plan.patched}

    def produce(key: str) -> torch.Tensor:
        release_freed_memory()  # the previous tensor's temporaries
        module = patched.get(key)
        if module is None:
            return ft.read(key)
        weights, fix = _realigned(sources, plan, config, norms, module)
        return realigned_weight(weights, fix)

    for shard in tqdm(ft.shards, desc="nlsr: writing shards", unit="shard", disable=not progress):
        write_shard(folder / shard, {k: ft.tensors[k] for k in ft.keys_in(shard)}, produce)
    if ft.sharded:
        write_index(folder, ft)
    for name in _copied_files(ft.folder):
        shutil.copyfile(ft.folder / name, folder / name)
    plan.save(folder / PLAN_NAME)
    from .io import atomic_write_text

    atomic_write_text(folder / CONFIG_FILE_NAME, config.to_json())


def _changed_outside(sources: _Sources, reference: Checkpoint) -> dict[str, float | None]:
    """Tensors outside the target modules that differ between the fine-tuned checkpoint and `reference` (the LoRA's
    base): name -> relative Frobenius change (None: absent from `reference` or of another shape). Compared a block
    of rows at a time, so an embedding is never read whole twice."""
    inside = {f"{m}.weight" for m in sources.modules}
    changed: dict[str, float | None] = {}
    for key in sorted(set(sources.finetuned.tensors) - inside):
        release_freed_memory()
        info, other = sources.finetuned.tensors[key], reference.tensors.get(key)
        if other is None or other.shape != info.shape:
            changed[key] = None
            continue
        diff = size = 0.0
        for block in _row_blocks(info):
            mine = _read_block(sources.finetuned, key, block).to(torch.float64)
            theirs = _read_block(reference, key, block).to(torch.float64)
            diff += float((mine - theirs).square().sum())
            size += float(theirs.square().sum())
        if diff > 0.0:
            changed[key] = (diff / size) ** 0.5 if size > 0 else diff ** 0.5
    return changed


def _row_blocks(info: Any, block_bytes: int = 1 << 20) -> list[range | None]:
    """Row ranges of about `block_bytes` covering a tensor (`TensorInfo`); ``[None]`` (read whole) for a scalar."""
    if not info.shape or info.shape[0] == 0:
        return [None]
    rows = max(1, block_bytes // max(1, info.nbytes // info.shape[0]))
    return [range(start, min(start + rows, info.shape[0])) for start in range(0, info.shape[0], rows)]


def _read_block(checkpoint: Checkpoint, key: str, block: range | None) -> torch.Tensor:
    return checkpoint.read(key) if block is None else checkpoint.read_rows(key, block.start, block.stop)


def _extract_adapter(sources: _Sources, plan: RealignmentPlan, config: NLSRConfig,
                     norms: Mapping[str, torch.Tensor] | None, max_rank: int | None, base_spec: str,
                     progress: bool) -> tuple[LoraAdapter, RealignmentPlan]:
    """Pass 2, LoRA: every target module's realigned update (relative to the base, else to the aligned model) by
    truncated SVD; the plan gains each module's rank and relative error."""
    from collections import Counter

    modules, ranks, errors = {}, {}, {}
    for module in tqdm(sources.modules, desc="nlsr: extracting LoRA", unit="module", disable=not progress):
        release_freed_memory()
        weights, fix = _realigned(sources, plan, config, norms, module)
        reference = weights.base if weights.base is not None else weights.aligned
        update = weights.finetuned.to(torch.float32) - reference.to(torch.float32)
        if fix is not None:
            update += fix
        del weights, reference, fix  # only the update goes into the SVD
        modules[module], errors[module] = extract_lora(update, config.kept_energy, max_rank)
        ranks[module] = modules[module].rank
    rank = min(r for r, n in Counter(ranks.values()).items() if n == max(Counter(ranks.values()).values()))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({module_type(m) for m in modules}), "base_model_name_or_path": base_spec,
    }
    return LoraAdapter(modules=modules, config=peft_config), with_outcomes(plan, ranks, errors)


def _resolve(spec: str | Path, hub: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    from .hub import MODEL_PATTERNS, resolve

    resolved = resolve(spec, files=(), patterns=MODEL_PATTERNS, **hub)
    return resolved.local_path, resolved.lineage()


def _check_call(config: Any, output_format: Any, max_rank: Any, output: Any, dry_run: bool, has_base: bool) -> None:
    """Cheap checks before any checkpoint is read: each names the argument and the accepted values."""
    if not isinstance(config, NLSRConfig):
        raise TypeError(f"`config` must be an NLSRConfig (got {type(config).__name__}).")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"Unknown `output_format` {output_format!r}; valid values: {', '.join(OUTPUT_FORMATS)}.")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"`max_rank` must be a positive integer or None (got {max_rank!r}).")
    if output is None and not dry_run:
        raise ValueError("Pass `output` (a new folder), or `dry_run=True` for the plan only.")
    check_dense_restorer(config, has_base)


def realign_full_finetune(
    finetuned: str | Path,
    *,
    aligned: str | Path,
    base: str | Path | None = None,
    output: str | Path | None = None,
    output_format: str = "dense",
    config: NLSRConfig | None = None,
    calibration: Any = None,
    targets: Sequence[str] = LLAMA_TARGETS,
    max_rank: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    **hub_kwargs: Any,
) -> FullFinetuneResult:
    """Realign the dense fine-tuned checkpoint `finetuned` against `aligned` (and `base`); see the module docstring.

    Args:
        finetuned, aligned, base: transformers checkpoints (local folders or Hub ids, safetensors only).
        output: the new folder; ``output_format`` ``"dense"`` (a checkpoint) or ``"lora"`` (a PEFT adapter).
        config: restorer ``addback``, ``interpolate``, ``nlsr-addback`` or ``nlsr-dense`` with its knobs (default:
            ``NLSRConfig.preset("default")``); ``kept_energy`` sets the LoRA extraction's rank.
        calibration: pairs for the ``nlsr-*`` restorers' calibration pass on the aligned model (default: built-in).
        max_rank: cap of every extracted module's rank (``lora`` output).
        dtype, device, max_memory, offload_folder: how the aligned model is loaded for that pass (`nlsr_hub.offload`).
        hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``.
    """
    from .io import check_output_folder
    from .offload import parse_max_memory
    from .result import RESULT_FILES

    config = config if config is not None else NLSRConfig.preset("default")
    _check_call(config, output_format, max_rank, output, dry_run, base is not None)
    parse_max_memory(max_memory)
    paths, lineage = {}, {}
    for role, spec in (("finetuned", finetuned), ("aligned", aligned), ("base", base)):
        if spec is not None:
            paths[role], lineage[role] = _resolve(spec, hub_kwargs)
    sources = _sources(paths["finetuned"], paths["aligned"], paths.get("base"), targets)
    owned = RESULT_FILES if output_format == "lora" else _dense_files(sources)
    if not dry_run:
        check_output_folder(output, owned=owned, marker=PLAN_NAME, inputs=paths, flag="output")
    norms, calibration_meta = None, {}
    if config.restorer in NEEDS_NORMS:
        load = {"dtype": dtype, "device": device, "max_memory": max_memory, "offload_folder": offload_folder}
        norms, calibration_meta = _calibration_norms(paths["aligned"], sources.modules, config, calibration, load,
                                                     progress)
    inputs = {**lineage, "full_finetune": {"output_format": output_format, "targets": sorted(targets),
                                           "modules": len(sources.modules)}}
    plan = plan_full_finetune(sources, config, norms, inputs=inputs, calibration=calibration_meta, progress=progress)
    if dry_run:
        return FullFinetuneResult(plan, None, output_format)
    if output_format == "dense":
        from .io import atomic_directory

        with atomic_directory(output, owned=owned, marker=PLAN_NAME) as staging:
            _write_dense(sources, plan, config, norms, staging, progress)
        return FullFinetuneResult(plan, Path(output), output_format)
    base_role = "base" if base is not None else "aligned"
    adapter, plan = _extract_adapter(sources, plan, config, norms, max_rank, str(lineage[base_role]["spec"]), progress)
    lost = _changed_outside(sources, sources.base if sources.base is not None else sources.aligned)
    if lost:
        logger.warning("%d tensor(s) outside the target modules differ from the %s checkpoint and are not in the LoRA "
                       "(e.g. %s); use output_format='dense' to keep them", len(lost), base_role, next(iter(lost)))
    plan = _with_lost(plan, lost)
    StreamedResult(plan=plan, adapter=adapter, config=config).save_pretrained(output)
    return FullFinetuneResult(plan, Path(output), output_format)


class StreamedResult(RealignmentResult):
    """A `RealignmentResult` whose adapter weights are streamed into the file tensor by tensor (no serialised copy of
    an extracted LoRA, which for a large model and rank is the biggest thing in memory)."""

    def _write_adapter(self, directory: Path) -> None:
        import json

        from .adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_config_for, adapter_state_dict, check_finite
        from .dense_checkpoint import TensorInfo
        from .io import atomic_write_text

        check_finite(self.adapter, "the adapter to save")
        state = adapter_state_dict(self.adapter)
        write_shard(directory / WEIGHTS_NAME, {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in state.items()},
                    state.__getitem__)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(adapter_config_for(self.adapter), indent=2) + "\n")


def _with_lost(plan: RealignmentPlan, lost: Mapping[str, float | None]) -> RealignmentPlan:
    """The plan recording which tensors outside the target modules the LoRA leaves out."""
    import dataclasses

    inputs = dict(plan.inputs)
    inputs["full_finetune"] = {**inputs["full_finetune"], "not_in_lora": dict(sorted(lost.items()))}
    return dataclasses.replace(plan, inputs=inputs)


__all__ = ["OUTPUT_FORMATS", "FullFinetuneResult", "plan_full_finetune", "realign_full_finetune", "target_modules"]

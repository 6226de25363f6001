"""PEFT LoRA adapters on disk <-> `LoraAdapter` in memory.

This is the only module that knows PEFT's file and key format. In memory an adapter is a mapping from the
canonical module name (as ``named_modules()`` of the base model spells it, e.g.
``model.layers.0.self_attn.q_proj``) to a `LoraModule` holding ``A`` (r x d_in), ``B`` (d_out x r) and the
module's scale ``s``, so that the module's weight update is ``s * B @ A``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError
from .io import atomic_directory, atomic_file, atomic_write_text, check_readable_file, read_text_file
from .variants import check_config_variant, check_tensor_key

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
ADAPTER_FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")  # what an adapter folder written here may hold
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_LAYER_RE = re.compile(r"\.(\d+)\.")
# the projections of a Llama-style block (Llama, Mistral, Qwen2, Gemma, SmolLM2 naming): the usual LoRA targets
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_index(module_name: str) -> int | None:
    """The block index of a module (the first ``.<digits>.`` component), or None outside the blocks."""
    match = _LAYER_RE.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def block_order(block: int | None) -> tuple[bool, int]:
    """Sort key of block indices: blocks in order, modules outside the blocks (None) last."""
    return (block is None, block if block is not None else 0)


def module_type(module_name: str) -> str:
    """The module's own name inside its block, e.g. ``q_proj``."""
    return module_name.rsplit(".", 1)[-1]


# dtypes whose every value float32 holds exactly (a round trip through float32 is the identity)
F32_EXACT = frozenset({torch.float32, torch.bfloat16, torch.float16})


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask viewed as uint8 0/1 (no copy): torch turns uint8 into floats with vector instructions but
    bool one element at a time (~4x slower), and the 0.0/1.0 it multiplies by are the same."""
    return mask.view(torch.uint8)


def fresh_copy(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh, contiguous copy in `dtype`. BLAS may round differently by where its inputs sit (a memory map, Ray's
    object store), so factors are multiplied from such copies, which start where the allocator aligns them."""
    return tensor.to(dtype, memory_format=torch.contiguous_format, copy=True)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear module: ``delta = scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if not isinstance(self.A, torch.Tensor) or not isinstance(self.B, torch.Tensor):
            raise TypeError(f"LoRA factors must be tensors (got {type(self.A).__name__}, {type(self.B).__name__}).")
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise AdapterError(
                f"LoRA factors do not chain: A has shape {tuple(self.A.shape)}, B has shape {tuple(self.B.shape)}; "
                "expected A (r x d_in) and B (d_out x r)."
            )
        if self.A.shape[0] == 0 or not self.A.is_floating_point() or not self.B.is_floating_point():
            raise AdapterError(f"LoRA factors must be floating-point with rank >= 1 (got A {self.A.dtype} "
                               f"{tuple(self.A.shape)}, B {self.B.dtype} {tuple(self.B.shape)}).")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"A LoRA scale must be a number (got {self.scale!r}).")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight update."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense weight update in float32, multiplied from fresh copies of the factors (`fresh_copy`)."""
        return self.scale * (fresh_copy(self.B) @ fresh_copy(self.A))


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter: modules by canonical name, the PEFT config it came with, and passthrough tensors."""

    modules: Mapping[str, LoraModule]
    config: Mapping[str, Any]
    extra_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[name]

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


# --------------------------------------------------------------------------------------------- reading


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key matching the end of the module name wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scale(config: Mapping[str, Any], name: str, rank: int) -> float:
    """The LoRA scale PEFT gives module `name` of rank `rank` under `config`."""
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    denominator = math.sqrt(rank) if config.get("use_rslora", False) else rank
    return float(alpha) / denominator


def _config_error(path: Path, key: str, expected: str, value: Any) -> AdapterError:
    return AdapterError(f"{path}: `{key}` must be {expected} (got {value!r}); the file is damaged, re-save the "
                        "adapter.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def check_adapter_config(config: Any, path: Path) -> dict[str, Any]:
    """`config` (the parsed ``adapter_config.json`` at `path`) if its fields have the types and ranges PEFT gives
    them; an `AdapterError` naming the field otherwise."""
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object (got {type(config).__name__}); the file is damaged, "
                           "re-save the adapter.")
    if "r" in config and (not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] < 1):
        raise _config_error(path, "r", "a positive integer", config["r"])
    if "lora_alpha" in config and (not _is_number(config["lora_alpha"]) or config["lora_alpha"] == 0):
        raise _config_error(path, "lora_alpha", "a finite, non-zero number", config["lora_alpha"])
    for key in ("use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise _config_error(path, key, "true or false", config[key])
    for key, valid in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                       ("alpha_pattern", lambda v: _is_number(v) and v != 0)):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and _compiles(k) and valid(v)
                                                    for k, v in pattern.items()):
            raise _config_error(path, key, "an object of module patterns to " + (
                "positive integers" if key == "rank_pattern" else "finite, non-zero numbers"), pattern)
    for key in ("peft_type", "base_model_name_or_path"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise _config_error(path, key, "a string", config[key])
    for key, value in config.items():
        if not _all_finite(value):
            raise _config_error(path, key, "free of NaN and infinity (they are not valid JSON)", value)
    return config


def _all_finite(value: Any) -> bool:
    """False if a float anywhere inside `value` (lists and objects included) is NaN or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.exists():
        raise AdapterError(
            f"{directory} is not a PEFT adapter: `{CONFIG_NAME}` is missing. Point to the folder written by "
            "`PeftModel.save_pretrained`."
        )
    try:
        config = check_adapter_config(json.loads(read_text_file(path, "Adapter config")), path)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the file is corrupt, re-save the adapter.") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{directory} holds a {peft_type} adapter; nlsr-hub works on LoRA adapters only.")
    check_config_variant(config, str(directory))  # DoRA, lora_bias, ...: one error naming the variant
    return config


def _read_tensors(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    pickled = directory / PICKLE_WEIGHTS_NAME
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_readable_file(weights, "Adapter weights")
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterError(
                f"{weights} could not be read as safetensors ({err}). The file is corrupt or truncated: "
                "download or save the adapter again."
            ) from None
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{directory} only has pickled weights (`{PICKLE_WEIGHTS_NAME}`). Pickle files can run arbitrary "
                "code when loaded, so nlsr-hub refuses them by default. Convert the adapter to safetensors "
                "(`PeftModel.save_pretrained(..., safe_serialization=True)`), or pass `allow_pickle=True` "
                "if you trust its source (it is then read with `torch.load(weights_only=True)`)."
            )
        check_readable_file(pickled, "Adapter weights")
        try:
            loaded = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad or unsafe pickle; none may escape as a crash
            raise AdapterError(f"{pickled} could not be read with `weights_only=True` ({type(err).__name__}: "
                               f"{err}); it is corrupt or holds more than tensors. Convert it to safetensors."
                               ) from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in loaded.items()):
            raise AdapterError(f"{pickled} does not hold a mapping of tensor names to tensors; re-save the adapter.")
        return loaded
    raise AdapterError(
        f"{directory} has `{CONFIG_NAME}` but no weights: `{WEIGHTS_NAME}` is missing. Save the adapter again."
    )


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory into a `LoraAdapter` (canonical names, per-module scales).

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: read a pickled ``adapter_model.bin`` (with ``weights_only=True``) when no
            safetensors file exists. Off by default: pickle files can execute code.
    """
    directory = Path(path)
    if directory.is_file():
        raise AdapterError(f"{directory} is a file, not an adapter folder; pass the folder that holds it "
                           f"({directory.parent}).")
    if not directory.is_dir():
        raise AdapterError(f"Adapter folder {directory} does not exist; pass a local folder or a Hub repo id.")
    config = _read_config(directory)
    factors, extra = _group_factors(directory, _read_tensors(directory, allow_pickle))
    modules = {name: _build_module(directory, name, factors[name], config) for name in sorted(factors)}
    adapter = LoraAdapter(modules=modules, config=config, extra_tensors=extra)
    check_finite(adapter, str(directory))
    return adapter


def _group_factors(directory: Path, tensors: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's tensors grouped as ``{module: {"A": ..., "B": ...}}``, plus the tensors that are not LoRA factors."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        check_tensor_key(key, str(directory))
        bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        match = _KEY_RE.match(bare)
        if match is None:
            extra[key] = tensor
            continue
        factors.setdefault(match.group("module"), {})[match.group("factor")] = tensor
    if not factors:
        raise AdapterError(f"{directory} holds no LoRA tensors (no `*.lora_A.weight` keys); is it a LoRA adapter?")
    return factors, extra


def _build_module(directory: Path, name: str, pair: Mapping[str, torch.Tensor], config: Mapping[str, Any]
                  ) -> LoraModule:
    """One module from its two factors, its rank checked against the config and its scale as PEFT computes it."""
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise AdapterError(f"{directory}: module {name!r} has no lora_{missing} tensor; the file is incomplete.")
    rank = int(pair["A"].shape[0]) if pair["A"].ndim == 2 else 0
    if rank < 1:
        raise AdapterError(f"{directory}: module {name!r} has lora_A of shape {tuple(pair['A'].shape)}; a LoRA "
                           "factor A must be a matrix of rank >= 1 (r x d_in). The file is damaged.")
    configured = _pattern_value(config.get("rank_pattern"), name, config.get("r", rank))
    if int(configured) != rank:
        raise AdapterError(
            f"{directory}: module {name!r} has rank {rank} in its weights but {configured} in "
            f"`{CONFIG_NAME}` (r / rank_pattern); the config and weights do not belong together."
        )
    try:
        return LoraModule(pair["A"], pair["B"], module_scale(config, name, rank))
    except AdapterError as err:
        raise AdapterError(f"{directory}: module {name!r}: {err}") from None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of the floating-point `tensor` is finite, in one reduction pass: its minimum and maximum
    are finite exactly when it holds no NaN (which both propagate) and no infinity. `torch.isfinite(t).all()` gives
    the same answer but builds a boolean tensor first, 10-30x slower on CPU (bf16 has no vectorised kernel)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(low.item()) and math.isfinite(high.item())


def check_finite(adapter: LoraAdapter, source: str) -> None:
    """Raise an `AdapterError` naming the module if any factor or scale of `adapter` is NaN or infinite (`source`
    names the adapter in the message)."""
    for name in sorted(adapter.modules):
        module = adapter.modules[name]
        if not math.isfinite(module.scale):
            raise AdapterError(f"{source}: module {name!r} has a non-finite LoRA scale ({module.scale}); check "
                               "`lora_alpha` / `alpha_pattern` and `beta`.")
        for factor, tensor in (("lora_A", module.A), ("lora_B", module.B)):
            if not all_finite(tensor):
                raise AdapterError(f"{source}: module {name!r} has NaN or infinite values in {factor}; the adapter "
                                   "is damaged (a diverged training run or a corrupt file): retrain or re-download it.")


# --------------------------------------------------------------------------------------------- writing


def _alpha_for(scale: float, rank: int, rslora: bool) -> float | int:
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    return int(alpha) if float(alpha).is_integer() else alpha


def adapter_config_for(adapter: LoraAdapter) -> dict[str, Any]:
    """The PEFT config of `adapter`: its own config plus explicit rank/alpha patterns where a module's
    rank or scale differs from what the config alone would give it. New pattern entries come first, so
    PEFT's first-match lookup finds them before any broader pattern of the source config."""
    config = copy.deepcopy(dict(adapter.config))
    rslora = bool(config.get("use_rslora", False))
    alphas = {_alpha_for(m.scale, m.rank, rslora) for m in adapter.modules.values()}
    if len(alphas) == 1 and not config.get("alpha_pattern"):
        config["lora_alpha"] = alphas.pop()  # one alpha for all (e.g. an EXPO reference): no pattern needed
    new_ranks: dict[str, int] = {}
    new_alphas: dict[str, float | int] = {}
    for name, module in adapter.modules.items():
        configured_rank = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", module.rank)))
        if configured_rank != module.rank:
            new_ranks[name] = module.rank
        same_scale = math.isclose(module_scale(config, name, module.rank), module.scale, rel_tol=1e-12, abs_tol=0.0)
        if not same_scale or name in new_ranks:
            new_alphas[name] = _alpha_for(module.scale, module.rank, rslora)
    if new_ranks:
        config["rank_pattern"] = {**new_ranks, **{k: v for k, v in (config.get("rank_pattern") or {}).items()
                                                  if k not in new_ranks}}
    if new_alphas:
        config["alpha_pattern"] = {**new_alphas, **{k: v for k, v in (config.get("alpha_pattern") or {}).items()
                                                    if k not in new_alphas}}
    config["peft_type"] = "LORA"
    return config


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for `adapter` (keys ``base_model.model.<module>.lora_{A,B}.weight``)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        state[f"{_PREFIX}{name}.lora_A.weight"] = module.A.contiguous()
        state[f"{_PREFIX}{name}.lora_B.weight"] = module.B.contiguous()
    state.update({k: v.contiguous() for k, v in adapter.extra_tensors.items()})
    return state


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` to the safetensors file `path` atomically and durably, straight from the tensors into the
    file: the same bytes as ``safetensors.torch.save(tensors, metadata)``, without first building them in memory
    (two extra copies of the whole file)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))


def write_adapter_files(adapter: LoraAdapter, folder: Path) -> None:
    """Write `adapter`'s two PEFT files into the existing `folder` (byte-deterministic); NaN or infinite values are
    refused, never written."""
    check_finite(adapter, "the adapter to save")
    state = adapter_state_dict(adapter)
    write_safetensors(folder / WEIGHTS_NAME, dict(sorted(state.items())), metadata={"format": "pt"})
    try:
        config_text = json.dumps(adapter_config_for(adapter), indent=2, allow_nan=False)
    except ValueError:
        raise AdapterError("The adapter's config holds NaN or infinity, which is not valid JSON; fix the source "
                           f"`{CONFIG_NAME}`.") from None
    atomic_write_text(folder / CONFIG_NAME, config_text + "\n")


def save_adapter(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write `adapter` as a stock PEFT adapter folder: written beside `path` and swapped in as a whole (an earlier
    adapter folder there is replaced, a folder holding other files is refused), byte-deterministic."""
    with atomic_directory(path, owned=ADAPTER_FOLDER_FILES) as staging:
        write_adapter_files(adapter, staging)
    return Path(path)


def check_peft_config(adapter: LoraAdapter) -> None:
    """Raise an `AdapterError` if PEFT refuses `adapter`'s config (checked before a model is loaded for it)."""
    try:
        peft_config_object(adapter)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"PEFT refuses the adapter's `{CONFIG_NAME}`: {' '.join(str(err).split())}") from None


def peft_config_object(adapter: LoraAdapter) -> Any:
    """A `peft.LoraConfig` for `adapter` (used to attach it to a model in memory)."""
    from peft import LoraConfig

    config = adapter_config_for(adapter)
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type")}
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules"):
        kwargs.pop(key, None)
    kwargs["target_modules"] = sorted(adapter.modules)  # exact names: attach to these modules only
    kwargs["lora_dropout"] = 0.0
    kwargs["inference_mode"] = True
    return LoraConfig(**kwargs)


"""`nlsr env`: what a bug report needs (like ``accelerate env``): versions, the device, the training precision
this machine would get and why, the cache folders, and where the model and each benchmark data set resolve."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from .hardware import NATIVE_BF16_FLAGS, PRECISION_ENV, bf16_decision, cpu_flags, cpu_name

PACKAGES = ("nlsr-hub", "torch", "transformers", "peft", "huggingface_hub", "safetensors", "accelerate", "trl",
            "datasets", "evaluate", "gradio", "ray")
CPU_FEATURES = ("avx2", "avx512f", *NATIVE_BF16_FLAGS)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    """CPU model, cores and the features that decide speed; the CUDA device, if any."""
    import torch

    flags = cpu_flags()
    cuda = torch.cuda.is_available()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_features": {f: f in flags for f in CPU_FEATURES},
            "cuda": torch.cuda.get_device_name(0) if cuda else None,
            "cuda_bf16": bool(cuda and torch.cuda.is_bf16_supported())}


def precision_info(device: dict[str, Any]) -> dict[str, Any]:
    """The training precision `nlsr demo` would use here, and why (``$NLSR_PRECISION`` wins when set)."""
    forced = os.environ.get(PRECISION_ENV, "auto").strip().lower()
    if forced in ("bf16", "fp32"):
        return {"bf16": forced == "bf16", "reason": f"training in {forced}: forced by ${PRECISION_ENV}"}
    use, reason = bf16_decision(cuda=device["cuda"] is not None, cuda_bf16=device["cuda_bf16"],
                                flags={f for f, present in device["cpu_features"].items() if present})
    return {"bf16": use, "reason": reason}


def cache_info() -> dict[str, str]:
    """The Hugging Face cache and nlsr-hub's own cache (model, wheels, experiment stages)."""
    from huggingface_hub import constants

    nlsr = os.environ.get("NLSR_CACHE", str(Path.home() / ".cache" / "nlsr-hub"))
    return {"hf_hub_cache": str(constants.HF_HUB_CACHE), "nlsr_cache": nlsr,
            "hf_hub_offline": str(bool(constants.HF_HUB_OFFLINE))}


def data_info(data: str | Path | None = None) -> dict[str, Any]:
    """Where each benchmark data set resolves (needs the ``train`` extra; reported as unavailable otherwise)."""
    try:
        from .experiments.data import data_sources
    except ImportError as err:
        return {"error": f"the experiments need the `train` extra ({err})"}
    return data_sources(data)


def model_info() -> str:
    """Where the experiments' base model resolves: ``$NLSR_MODEL``'s folder, else the pinned Hub source (cached or
    not), else the registry wheel."""
    try:
        from .experiments.smollm import describe_model
    except ImportError as err:
        return f"the experiments need the `train` extra ({err})"
    return describe_model()


def environment(data: str | Path | None = None) -> dict[str, Any]:
    """Everything `nlsr env` prints, as a dict (JSON-able)."""
    device = device_info()
    return {"platform": platform.platform(), "python": platform.python_version(), "packages": package_versions(),
            "device": device, "training_precision": precision_info(device), "caches": cache_info(),
            "model": model_info(), "data": data_info(data)}


def cpu_line(device: dict[str, Any]) -> str:
    """The CPU of `device_info` on one line: model, cores, torch threads and each speed-deciding feature."""
    features = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in device["cpu_features"].items())
    return f"{device['cpu']}, {device['cores']} cores (torch threads {device['torch_threads']}); {features}"


def format_environment(info: dict[str, Any]) -> str:
    """`environment()` as the text a bug report pastes."""
    device, precision = info["device"], info["training_precision"]
    lines = ["nlsr-hub environment", "",
             f"- platform: {info['platform']}, Python {info['python']}",
             *(f"- {name}: {version or 'not installed'}" for name, version in info["packages"].items()),
             f"- CPU: {cpu_line(device)}",
             f"- GPU: {device['cuda'] or 'none'}" + (f" (bf16: {device['cuda_bf16']})" if device["cuda"] else ""),
             f"- training precision: {'bf16' if precision['bf16'] else 'fp32'} ({precision['reason']})",
             *(f"- {name}: {value}" for name, value in info["caches"].items()),
             f"- model (SmolLM2-135M-Instruct): {info['model']}"]
    data = info["data"]
    if "error" in data:
        lines.append(f"- data: {data['error']}")
    else:
        lines.append(f"- data folder: {data['root']} ({'present' if data['root_exists'] else 'absent'})")
        lines += [f"  - {name}: {where}" for name, where in data["sets"].items()]
    return "\n".join(lines)


__all__ = ["environment", "format_environment"]

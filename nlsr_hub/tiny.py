"""A tiny, fully offline example trio: a 2-block Llama base, an aligned LoRA and a fine-tuned LoRA.

The fine-tuned adapter is "resumed" from the aligned one (small drift everywhere) except in the
`damaged` modules, whose updates are replaced by unrelated ones: the modules NLSR should find and patch.
Used by ``nlsr demo``, the examples and the tests; everything is seeded, so it builds byte-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import LLAMA_TARGETS as TARGETS
from .calibration import default_calibration

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_DAMAGED = ("model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj")


@dataclass(frozen=True)
class Trio:
    """Folders of the example: base model, aligned adapter, fine-tuned adapter; and the damaged modules."""

    base: Path
    aligned: Path
    finetuned: Path
    damaged: tuple[str, ...]


def build_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer with a ChatML template, trained on the built-in calibration texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for pair in default_calibration() for t in (pair.prompt, pair.response)]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_base(path: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a randomly initialised tiny Llama (with its tokenizer) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _lora_model(base: Path, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0)
    return get_peft_model(model, config)


def _save_sorted(peft_model, path: Path) -> None:
    """`save_pretrained`, then `target_modules` written sorted (PEFT keeps a set: its order depends on the
    process's hash seed), so the folder is byte-identical across processes."""
    import json

    peft_model.save_pretrained(path)
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_trio(
    root: str | Path, *, seed: int = 0, rank: int = 8, damaged: tuple[str, ...] = DEFAULT_DAMAGED,
    drift: float = 0.05,
) -> Trio:
    """Build base, aligned and fine-tuned folders under `root` (see the module docstring)."""
    root = Path(root)
    base = build_tiny_base(root / "base", seed=seed)
    peft_model = _lora_model(base, rank)
    generator = torch.Generator().manual_seed(seed + 1)
    names = []
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            names.append(name)
            with torch.no_grad():
                for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                    factor.copy_(torch.randn(factor.shape, generator=generator) * 0.2)
    unknown = set(damaged) - set(names)
    if unknown:
        raise ValueError(f"`damaged` names modules the model does not have: {sorted(unknown)}.")
    _save_sorted(peft_model, root / "aligned")
    for name, module in peft_model.base_model.model.named_modules():
        if name not in names:
            continue
        with torch.no_grad():
            for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                if name in damaged:
                    factor.copy_(torch.randn(factor.shape, generator=generator) * 0.2)
                else:
                    factor.add_(torch.randn(factor.shape, generator=generator) * drift * 0.2)
    _save_sorted(peft_model, root / "finetuned")
    return Trio(base=base, aligned=root / "aligned", finetuned=root / "finetuned", damaged=tuple(damaged))

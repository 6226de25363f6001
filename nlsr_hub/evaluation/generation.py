"""Batched greedy generation through the model's chat template (left padding), with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def render_prompt(tokenizer: Any, prompt: str, *, use_chat_template: bool = True) -> str:
    """The text fed to the model for a user `prompt` (a chat turn when the tokenizer has a template)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    use_chat_template: bool = True,
    progress: bool = True,
    desc: str = "nlsr: generate",
) -> list[str]:
    """Greedy responses to `prompts` (new tokens only, special tokens removed)."""
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1 (got {max_new_tokens}).")
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    responses: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            texts = [render_prompt(tokenizer, p, use_chat_template=use_chat_template)
                     for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                              max_length=max_prompt_tokens, add_special_tokens=False).to(device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            responses.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return responses

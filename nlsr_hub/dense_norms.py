"""Input-activation norms of a dense model's linear modules over the calibration responses (constant memory).

What the dense restorers weigh an update with, ``‖x_j‖₂`` of each input feature over the response tokens, recorded
with forward pre-hooks on the modules themselves (no adapter): for a full fine-tune the pass runs on the aligned
checkpoint. Hooks are always removed; the model may be dispatched by accelerate (offloaded layers included).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration import CalibrationPair, encode_pairs, iter_batches
from .offload import input_device


def dense_input_norms(
    model: Any, tokenizer: Any, pairs: Sequence[CalibrationPair], names: Iterable[str], *, batch_size: int = 8,
    max_length: int = 512, progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """``{module: ‖x_j‖₂ (d_in, float32)}`` for the linear modules `names` of `model`, over the response tokens of
    `pairs`, and the number of response tokens seen."""
    names = sorted(names)
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    state: dict[str, Any] = {"mask": None, "tokens": 0}

    def hook_for(name: str):
        def hook(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            rows = x.detach().reshape(-1, x.shape[-1])[state["mask"].to(x.device)]
            square = rows.to(torch.float32).square().sum(dim=0).to(torch.float64).cpu()
            sums[name] = square if sums[name] is None else sums[name].add_(square)

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    samples = encode_pairs(tokenizer, pairs, max_length)
    try:
        batches = iter_batches(samples, batch_size, pad_id)
        for batch in tqdm(batches, total=-(-len(samples) // batch_size), desc="nlsr: calibration", unit="batch",
                          disable=not progress):
            state["mask"] = batch["response_mask"].reshape(-1).bool()
            state["tokens"] += int(state["mask"].sum())
            with torch.no_grad():
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise ValueError(f"The calibration pass never reached module(s) {missing[:3]}; is every target module used "
                         "by the model's forward pass?")
    return {name: s.sqrt().to(torch.float32) for name, s in sums.items()}, state["tokens"]


__all__ = ["dense_input_norms"]

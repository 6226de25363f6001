"""The calibration pass: run the base model with the reference adapter and stream statistics.

Forward passes cover the activation statistics; the gradient scorers add a backward pass per batch on the
negative log-likelihood of the responses (``snip``) or on a DPO-style loss over (chosen, rejected) pairs
(``preference_snip``). Memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import LoraAdapter, block_order, layer_index
from .calibration import CalibrationPair, encode_pairs, encode_preference_pairs, iter_batches
from .hooks import StatsRecorder, lora_layer
from .modeling import ADAPTER_NAME, attached_adapter
from .offload import input_device
from .scoring import ModuleStats, low_rank_projection

logger = logging.getLogger(__name__)
DPO_BETA = 0.1


def response_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence sum of log-probabilities of the response tokens (batch,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def collect_statistics(
    model: Any,
    tokenizer: Any,
    reference: LoraAdapter,
    pairs: Sequence[CalibrationPair],
    *,
    needs: frozenset[str],
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    sparsity_ratio: float = 0.8,
    compat: bool = False,
) -> dict[str, ModuleStats]:
    """Statistics of every reference module over the calibration responses (see `nlsr_hub.scoring`).
    `sparsity_ratio` and `compat` only matter for ``sequential_activations`` (the projections in between)."""
    if not needs:
        return {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)  # an accelerate-dispatched base may hold its first weights on disk (meta)
    preference = "preference_gradients" in needs
    if preference:  # both sides of a pair are kept or dropped together, so the batches pair up by position
        chosen, rejected = encode_preference_pairs(tokenizer, pairs, max_length)
    else:
        chosen, rejected = encode_pairs(tokenizer, pairs, max_length), None
    if "sequential_activations" in needs:
        return _collect_sequential(model, reference, chosen, batch_size=batch_size, pad_id=pad_id, device=device,
                                   sparsity_ratio=sparsity_ratio, compat=compat, progress=progress)
    gradients = preference or "gradients" in needs
    n_batches = -(-len(chosen) // batch_size)
    with attached_adapter(model, reference, trainable=gradients) as peft_model, StatsRecorder(
        peft_model, reference.modules, ADAPTER_NAME, activations="activations" in needs
    ) as recorder:
        batches = iter_batches(chosen, batch_size, pad_id)
        rejected_batches = iter_batches(rejected, batch_size, pad_id) if rejected is not None else None
        for batch in tqdm(batches, total=n_batches, desc="nlsr: calibration", unit="batch", disable=not progress):
            batch = _to(batch, device)
            recorder.set_token_mask(batch["response_mask"])
            if not gradients:
                with torch.no_grad():
                    peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                continue
            if rejected_batches is None:
                tokens = batch["response_mask"][:, 1:].sum().clamp_min(1)
                loss = -response_logprobs(peft_model, batch).sum() / tokens
            else:
                other = _to(next(rejected_batches), device)
                chosen_lp = response_logprobs(peft_model, batch)
                rejected_lp = response_logprobs(peft_model, other)
                # DPO at the reference point (policy = reference): the margin's value is 0, its gradient is not.
                margin = (chosen_lp - chosen_lp.detach()) - (rejected_lp - rejected_lp.detach())
                loss = -F.logsigmoid(DPO_BETA * margin).mean()
            loss.backward()
            recorder.accumulate_gradients()
        stats = recorder.stats
        for module_stats in stats.values():
            module_stats.tokens = recorder.tokens_seen
    logger.info("calibration: %d samples, %d batches", len(chosen), n_batches)
    return stats


def check_finite_statistics(stats: dict[str, ModuleStats]) -> None:
    """Raise a `ValueError` naming the module if a calibration statistic is NaN or infinite (a base model with
    NaN weights, or a reference whose activations overflow the dtype): no mask is ever built from them."""
    for name in sorted(stats):
        for field in ("gram", "input_sq", "grad_A", "grad_B"):
            value = getattr(stats[name], field)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"The calibration pass gave NaN or infinite `{field}` statistics for module {name!r}: "
                                 "the base model or the reference overflows (check the base model's weights, use "
                                 "--dtype float32, or lower `beta`).")


class _StopForward(Exception):
    """Raised by a hook once the block being recorded has run: later blocks are not needed."""


def _stop_hook(name: str, seen: set[str], total: int):
    """A forward hook marking `name` as run; it stops the pass once all `total` recorded modules have run."""

    def hook(*_: Any) -> None:
        seen.add(name)
        if len(seen) == total:
            raise _StopForward

    return hook


def _collect_sequential(
    model: Any, reference: LoraAdapter, samples: Sequence[Any], *, batch_size: int, pad_id: int,
    device: torch.device, sparsity_ratio: float, compat: bool, progress: bool,
) -> dict[str, ModuleStats]:
    """Block by block: record a block's Gram statistics, then give its modules their low-rank projections,
    so block l+1 is recorded on the already-projected model. Each pass stops after the recorded block."""
    blocks: dict[int | None, list[str]] = {}
    for name in sorted(reference.modules):
        blocks.setdefault(layer_index(name), []).append(name)
    order = sorted(blocks, key=block_order)
    stats: dict[str, ModuleStats] = {}
    with attached_adapter(model, reference) as peft_model:
        for block in tqdm(order, desc="nlsr: sequential calibration", unit="block", disable=not progress):
            names = blocks[block]
            seen: set[str] = set()
            with StatsRecorder(peft_model, names, ADAPTER_NAME) as recorder:
                linears = {n: lora_layer(peft_model, n).lora_A[ADAPTER_NAME] for n in names}
                handles = [linears[n].register_forward_hook(_stop_hook(n, seen, len(names))) for n in names]
                try:
                    for batch in iter_batches(samples, batch_size, pad_id):
                        batch = _to(batch, device)
                        recorder.set_token_mask(batch["response_mask"])
                        seen.clear()
                        with torch.no_grad(), contextlib.suppress(_StopForward):
                            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                finally:
                    for handle in handles:
                        handle.remove()
            for name in names:
                module_stats = recorder.stats[name]
                module_stats.tokens = recorder.tokens_seen
                stats[name] = module_stats
                projected = low_rank_projection(reference.modules[name], module_stats.gram, sparsity_ratio, compat)
                layer = lora_layer(peft_model, name)
                with torch.no_grad():
                    layer.lora_A[ADAPTER_NAME].weight.copy_(projected.A)
                    layer.lora_B[ADAPTER_NAME].weight.copy_(projected.B)
    return stats


def count_response_tokens(tokenizer: Any, pairs: Sequence[CalibrationPair], max_length: int) -> int:
    """How many response tokens the calibration pass will see."""
    return sum(sum(s.response_mask) for s in encode_pairs(tokenizer, pairs, max_length))

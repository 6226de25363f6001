"""Record per-module statistics with forward hooks, in constant memory (no stored activations).

`StatsRecorder` hooks the ``lora_A`` linear of every adapted module: on response tokens it adds A's output
Gram ``Σ z zᵀ`` (r×r) and the sum of squares of A's input (d_in) to running float64 accumulators, and on
request it adds ``|∇A|`` and ``|∇B|`` after a backward pass. Hooks are always removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .scoring import ModuleStats


def lora_layer(model: Any, name: str) -> Any:
    """The PEFT LoRA layer wrapping module `name` (canonical name) inside a `PeftModel`."""
    return model.base_model.model.get_submodule(name)


class StatsRecorder:
    """Context manager streaming statistics of the modules `names` of a `PeftModel`.

    Call `set_token_mask` with the (batch x seq) response mask before each forward pass.
    """

    def __init__(self, model: Any, names: Iterable[str], adapter_name: str, *, activations: bool = True) -> None:
        self.model = model
        self.names = sorted(names)
        self.adapter_name = adapter_name
        self.activations = activations
        self.stats: dict[str, ModuleStats] = {name: ModuleStats() for name in self.names}
        self._mask: torch.Tensor | None = None
        self.tokens_seen = 0  # response tokens of every batch, whatever statistics are recorded
        self._handles: list[Any] = []
        self._last_input: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its Σ x²)

    def set_token_mask(self, mask: torch.Tensor) -> None:
        self._mask = mask.reshape(-1)
        self._last_input = None
        self.tokens_seen += int(self._mask.sum())

    def _hook(self, name: str):
        stats = self.stats[name]

        def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._mask is None:
                raise RuntimeError("StatsRecorder.set_token_mask must be called before the forward pass.")
            x = inputs[0]
            x_sel = x.detach().reshape(-1, x.shape[-1])[self._mask]
            z_sel = output.detach().reshape(-1, output.shape[-1])[self._mask].to(torch.float32)
            gram = (z_sel.T @ z_sel).to(torch.float64)
            # q, k and v (gate and up) see the same input tensor one after another: square it once.
            if self._last_input is not None and self._last_input[0] is x:
                input_sq = self._last_input[1]
            else:
                input_sq = x_sel.to(torch.float32).square().sum(dim=0).to(torch.float64)
                self._last_input = (x, input_sq)
            stats.gram = gram if stats.gram is None else stats.gram.add_(gram)
            stats.input_sq = input_sq.clone() if stats.input_sq is None else stats.input_sq.add_(input_sq)

        return hook

    def accumulate_gradients(self) -> None:
        """Add ``|∇A|`` and ``|∇B|`` of every module to the statistics, then clear the gradients."""
        for name in self.names:
            layer = lora_layer(self.model, name)
            stats = self.stats[name]
            for attr, container in (("grad_A", layer.lora_A), ("grad_B", layer.lora_B)):
                weight = container[self.adapter_name].weight
                if weight.grad is None:
                    continue
                grad = weight.grad.detach().abs().to(torch.float64)
                current = getattr(stats, attr)
                setattr(stats, attr, grad if current is None else current.add_(grad))
                weight.grad = None

    def __enter__(self) -> StatsRecorder:
        if self.activations:
            for name in self.names:
                linear = lora_layer(self.model, name).lora_A[self.adapter_name]
                self._handles.append(linear.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None

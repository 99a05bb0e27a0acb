"""Per-step token counts from the routing modules of DeepSpeed MoE layers.

A forward hook on each layer's routing module (``TopKGate`` of
``deepspeed.moe``, ``TokenChoiceTopKRouter`` of AutoEP) reads this rank's
tokens per global expert from the module's output and adds them to the
controller. Which forwards count is the core's one guard (:meth:`Excitation.count_this_forward`):
not evaluation (``module.training`` False); with activation checkpointing each
token once (the original forward, or for reentrant checkpointing, whose
original runs under ``no_grad``, the recompute in backward).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from excitation_dist.core import Excitation, in_backward

# (routing module of Excitation layer i, output -> int64 tokens per global expert [E])
Counter = tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]


def is_training_forward(module: torch.nn.Module) -> bool:
    """A forward that belongs to a training step (not evaluation, not a recompute)."""
    return module.training and torch.is_grad_enabled() and not in_backward()


def register_counters(counters: Sequence[Counter], excitation: Excitation) -> list[RemovableHandle]:
    """Hook every routing module; ``counters[i]`` feeds Excitation layer ``i``."""
    handles = []
    for index, (module, tokens_per_expert) in enumerate(counters):

        def count(module: torch.nn.Module, args: Any, output: Any, index: int = index,
                  tokens_per_expert: Callable[[Any], torch.Tensor] = tokens_per_expert) -> None:
            if excitation.count_this_forward(index, module.training):
                excitation.record(index, tokens_per_expert(output))

        handles.append(module.register_forward_hook(count))
    return handles

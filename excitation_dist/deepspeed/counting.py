"""Per-step token counts from the routing modules of DeepSpeed MoE layers.

A forward hook on each layer's routing module (``TopKGate`` of
``deepspeed.moe``, ``TokenChoiceTopKRouter`` of AutoEP) reads this rank's
tokens per global expert from the module's output and adds them to the
controller. Counted: training forwards with grad enabled, outside backward.
Not counted: evaluation (``module.training`` False), ``no_grad`` forwards,
and forwards that run inside backward (activation recompute), so a recomputed
layer counts once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from excitation_dist.core import Excitation

# (routing module of Excitation layer i, output -> int64 tokens per global expert [E])
Counter = tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation recompute happens)."""
    return torch._C._current_graph_task_id() != -1


def is_counted_forward(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled() and not in_backward()


def register_counters(counters: Sequence[Counter], excitation: Excitation) -> list[RemovableHandle]:
    """Hook every routing module; ``counters[i]`` feeds Excitation layer ``i``."""
    handles = []
    for index, (module, tokens_per_expert) in enumerate(counters):

        def count(module: torch.nn.Module, args: Any, output: Any, index: int = index,
                  tokens_per_expert: Callable[[Any], torch.Tensor] = tokens_per_expert) -> None:
            if not is_counted_forward(module):
                if module.training and torch.is_grad_enabled():
                    excitation.note_uncounted_recompute()
                return
            excitation.record(index, tokens_per_expert(output))

        handles.append(module.register_forward_hook(count))
    return handles

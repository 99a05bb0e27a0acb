"""Per-step token counts from the gates of ``deepspeed.moe`` layers.

A forward hook on each ``TopKGate`` reads its routing and adds this rank's
tokens per global expert to the controller. Counted: training forwards with
grad enabled, outside backward. Not counted: evaluation (``module.training``
False), ``no_grad`` forwards, and forwards that run inside backward
(activation recompute), so a recomputed layer counts once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from excitation_dist.core import Excitation
from excitation_dist.deepspeed import compat


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation recompute happens)."""
    return torch._C._current_graph_task_id() != -1


def is_counted_forward(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled() and not in_backward()


def register_gate_counters(layers: list[Any], excitation: Excitation) -> list[RemovableHandle]:
    """Hook every layer's gate; ``layers[i]`` is Excitation layer ``i``."""
    routed = excitation.config.counts == "routed"
    handles = []
    for index, layer in enumerate(layers):

        def count(gate: torch.nn.Module, args: Any, output: Any, index: int = index) -> None:
            if not is_counted_forward(gate):
                if gate.training and torch.is_grad_enabled():
                    excitation.note_uncounted_recompute()
                return
            if routed:
                tokens_E = compat.gate_routed_counts(output)
            else:
                tokens_E = compat.gate_processed_counts(output, excitation.num_experts)
            excitation.record(index, tokens_E)

        handles.append(layer.gate.register_forward_hook(count))
    return handles

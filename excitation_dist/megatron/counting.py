"""Per-step token counts at the routers of megatron-core MoE layers.

A forward hook on each ``BaseMoELayer.router`` adds this rank's (token, expert)
assignments of the router's ``routing_map`` (after top-k and capacity
dropping, padding excluded) to the controller. Counted: forwards with
``module.training and torch.is_grad_enabled()``, megatron's own guard for its
expert-bias counts. Megatron's activation recompute (``tensor_parallel.checkpoint``)
runs the original forward under ``no_grad`` and the recompute with grad
enabled, so a recomputed layer is counted exactly once (in backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from excitation_dist.core import Excitation
from excitation_dist.megatron import compat


def is_counted_forward(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def register_router_counters(layers: list[Any], excitation: Excitation) -> list[RemovableHandle]:
    """Hook every layer's router; ``layers[i]`` is Excitation layer ``i``."""
    handles = []
    for index, layer in enumerate(layers):

        def count(router: torch.nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index) -> None:
            if not is_counted_forward(router):
                return
            routing_map = compat.router_routing_map(output)
            tokens_E = compat.routed_tokens_per_expert(routing_map, compat.router_padding_mask(args, kwargs))
            excitation.record(index, tokens_E)

        handles.append(layer.router.register_forward_hook(count, with_kwargs=True))
    return handles

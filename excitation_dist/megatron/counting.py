"""Per-step token counts at the routers of megatron-core MoE layers.

A forward hook on each ``BaseMoELayer.router`` adds this rank's real
(token, expert) assignments to the controller: routes of the router's
``routing_map`` that carry a nonzero probability (:func:`compat.routed_tokens_per_expert`),
padding tokens excluded. That is right on every capacity setting: without a
capacity factor, with token dropping (dropped routes leave both the map and the
probabilities), and with ``moe_pad_expert_input_to_capacity``, where megatron
returns the capacity mask as the map and the padded slots have probability 0.
Which forwards count is the core's one guard (:meth:`Excitation.count_this_forward`):
megatron's activation recompute (``tensor_parallel.checkpoint``) runs the
original forward under ``no_grad`` and the recompute in backward, so a
recomputed layer is counted exactly once, in backward.
"""

from __future__ import annotations

from typing import Any

from torch.utils.hooks import RemovableHandle

from excitation_dist.core import Excitation
from excitation_dist.megatron import compat


def register_router_counters(layers: list[Any], excitation: Excitation) -> list[RemovableHandle]:
    """Hook every layer's router; ``layers[i]`` is Excitation layer ``i``."""
    handles = []
    for index, layer in enumerate(layers):

        def count(router: torch.nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index) -> None:
            if not excitation.count_this_forward(index, router.training):
                return
            probs, routing_map = compat.router_output(output)
            tokens_E = compat.routed_tokens_per_expert(probs, routing_map, compat.router_padding_mask(args, kwargs))
            excitation.record(index, tokens_E)

        handles.append(layer.router.register_forward_hook(count, with_kwargs=True))
    return handles

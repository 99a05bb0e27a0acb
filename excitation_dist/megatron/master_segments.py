"""Which elements of the tensors megatron's base optimizers step belong to which expert.

Megatron steps fp32 main parameters (:func:`compat.stepped_pieces`): the
params themselves (FP32Optimizer), full fp32 copies (Float16Optimizer), or
this rank's shard of each param (DistributedOptimizer), which can start or end
inside an expert or, for a stacked GroupedMLP weight, span several experts.
Expert ranges are given in the flattened param's coordinates
(:func:`compat.local_expert_ranges`); the core's scaffold
(:mod:`excitation_dist.shards`) cuts them to the stepped pieces.
"""

from __future__ import annotations

from typing import Any

from excitation_dist.core import ExpertSegment
from excitation_dist.megatron import compat
from excitation_dist.shards import expert_segments


def owned_expert_segments(layers: list[Any], optimizer: Any) -> list[ExpertSegment]:
    """Segments of every base-optimizer tensor this rank steps that belong to a
    routed expert of ``layers`` (index = Excitation layer)."""
    leaves = compat.leaf_optimizers(optimizer)
    pieces = [piece for leaf in leaves for piece in compat.stepped_pieces(leaf)]
    return expert_segments(
        [compat.local_expert_ranges(layer) for layer in layers], pieces,
        every_param_stepped=not any(compat.is_distributed(leaf) for leaf in leaves),
        hint="Build the optimizer with get_megatron_optimizer over the same model chunks passed to attach().",
    )

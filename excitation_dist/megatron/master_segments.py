"""Which elements of the tensors megatron's base optimizers step belong to which expert.

Megatron steps fp32 main parameters (:func:`compat.stepped_pieces`): the
params themselves (FP32Optimizer), full fp32 copies (Float16Optimizer), or
this rank's shard of each param (DistributedOptimizer), which can start or end
inside an expert or, for a stacked GroupedMLP weight, span several experts.
Expert ranges are given in the flattened param's coordinates
(:func:`compat.local_expert_ranges`); :func:`owned_expert_ranges` cuts them to
the stepped piece and shifts them into the stepped tensor's coordinates.
"""

from __future__ import annotations

from typing import Any

from excitation_dist.core import ExpertSegment
from excitation_dist.megatron import compat
from excitation_dist.segments import owned_expert_ranges


def owned_expert_segments(layers: list[Any], optimizer: Any) -> list[ExpertSegment]:
    """Segments of every base-optimizer tensor this rank steps that belong to a
    routed expert of ``layers`` (index = Excitation layer)."""
    expert_ranges = {}  # id(param) -> (layer, ranges)
    for layer_index, layer in enumerate(layers):
        for p, ranges in compat.local_expert_ranges(layer):
            expert_ranges[id(p)] = (layer_index, ranges, p)

    segments, seen, sharded = [], set(), False
    for leaf in compat.leaf_optimizers(optimizer):
        sharded |= compat.is_distributed(leaf)
        for piece in compat.stepped_pieces(leaf):
            found = expert_ranges.get(id(piece.model_param))
            if found is None:
                continue
            layer_index, ranges, _ = found
            seen.add(id(piece.model_param))
            for r in owned_expert_ranges(ranges, piece.start, piece.end):
                segments.append(ExpertSegment(piece.tensor, r.start, r.end, layer_index, r.expert))

    if not sharded:  # without sharding every trainable expert param must be stepped here
        missing = [p for pid, (_, _, p) in expert_ranges.items() if pid not in seen and p.requires_grad]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable expert parameters are stepped by none of the optimizer's torch optimizers; "
                "build the optimizer with get_megatron_optimizer over the same model chunks passed to attach()"
            )
    return segments

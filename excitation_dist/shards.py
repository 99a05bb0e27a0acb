"""The one scaffold that maps what an optimizer steps to expert segments.

Every framework steps expert parameters through tensors of its own: the
parameter itself, a full fp32 master copy, or a flat fp32 shard that holds a
contiguous range of the flattened parameter (a ZeRO-1/2/3 partition, a
DistributedOptimizer main shard), which can start or end inside an expert. An
adapter describes, per expert parameter, *which* range of it the base optimizer
steps and *where* (:class:`SteppedPiece`); this module intersects that with the
parameter's expert ranges (:func:`excitation_dist.segments.owned_expert_ranges`)
and returns the core's :class:`ExpertSegment` s. No framework is imported here.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch

from excitation_dist.core import ExpertSegment
from excitation_dist.segments import ExpertRange, owned_expert_ranges

# Per MoE layer: (expert parameter, its expert ranges in flattened-parameter coordinates).
ExpertParams = Sequence[tuple[torch.nn.Parameter, Sequence[ExpertRange]]]


class SteppedPiece(NamedTuple):
    """Elements ``[start, end)`` of the flattened ``param`` are stepped by the base
    optimizer as elements ``[offset, offset + end - start)`` of ``tensor``."""

    param: torch.nn.Parameter
    tensor: torch.Tensor
    start: int
    end: int
    offset: int = 0


def expert_segments(
    expert_params_by_layer: Sequence[ExpertParams],
    pieces: Iterable[SteppedPiece],
    *,
    every_param_stepped: bool,
    hint: str = "",
) -> list[ExpertSegment]:
    """Segments of the stepped tensors that belong to a routed expert.

    Args:
        expert_params_by_layer: per MoE layer (index = Excitation layer), this
            rank's expert parameters and their expert ranges.
        pieces: what the base optimizer(s) step on this rank; pieces of
            non-expert parameters are ignored.
        every_param_stepped: without sharding every trainable expert parameter
            must be stepped here; a missing one is an error (with ``hint``).
    """
    ranges = {id(p): (layer, p, experts) for layer, params in enumerate(expert_params_by_layer) for p, experts in params}
    segments, seen = [], set()
    for piece in pieces:
        found = ranges.get(id(piece.param))
        if found is None:
            continue
        layer, _, experts = found
        seen.add(id(piece.param))
        for r in owned_expert_ranges(experts, piece.start, piece.end, offset=piece.offset):
            segments.append(ExpertSegment(piece.tensor, r.start, r.end, layer, r.expert))
    if every_param_stepped:
        missing = [(layer, p) for key, (layer, p, _) in ranges.items() if key not in seen and p.requires_grad]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable expert parameter(s) (MoE layer(s) {sorted({l for l, _ in missing})}) are "
                f"stepped by no tensor of the optimizer. {hint}".strip()
            )
    return segments

"""Which elements of which tensors belong to which expert: pure index math.

Frameworks flatten and shard parameters (ZeRO partitions, Megatron
DistributedOptimizer shards); a rank owns a contiguous range of a flattened
parameter that can start or end inside an expert, or span several experts of a
stacked tensor. These helpers intersect expert ranges with owned ranges. They
use plain integers and know nothing of torch or any framework.

All ranges are half-open ``[start, end)`` element offsets.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple


class ExpertRange(NamedTuple):
    """Elements ``[start, end)`` of a flattened parameter that belong to ``expert``
    (global expert index)."""

    expert: int
    start: int
    end: int


def stacked_expert_ranges(numel: int, num_local_experts: int, first_expert: int = 0) -> list[ExpertRange]:
    """Ranges of a tensor that stacks ``num_local_experts`` equal experts along
    its flattened length (expert ``first_expert + i`` is chunk ``i``)."""
    if num_local_experts <= 0:
        raise ValueError(f"num_local_experts must be > 0, got {num_local_experts}")
    if numel % num_local_experts:
        raise ValueError(
            f"a stacked expert tensor of {numel} elements cannot hold {num_local_experts} equal experts"
        )
    chunk = numel // num_local_experts
    return [ExpertRange(first_expert + i, i * chunk, (i + 1) * chunk) for i in range(num_local_experts)]


def owned_expert_ranges(
    expert_ranges: Iterable[ExpertRange], owned_start: int, owned_end: int, offset: int = 0
) -> list[ExpertRange]:
    """Intersect expert ranges (in parameter coordinates) with the owned range
    ``[owned_start, owned_end)`` of the same parameter.

    Returns the non-empty intersections shifted by ``offset - owned_start``, i.e.
    in the coordinates of the buffer that holds the owned range at ``offset``
    (for example a rank's flat fp32 partition).
    """
    if owned_end < owned_start:
        raise ValueError(f"owned range [{owned_start}, {owned_end}) is reversed")
    out = []
    for r in expert_ranges:
        lo, hi = max(r.start, owned_start), min(r.end, owned_end)
        if lo < hi:
            out.append(ExpertRange(r.expert, lo - owned_start + offset, hi - owned_start + offset))
    return out

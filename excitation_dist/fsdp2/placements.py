"""Which elements of a DTensor's local shard belong to which global expert.

A DTensor of global shape ``S`` placed on a DeviceMesh holds, on each rank, the
elements whose index along each tensor dimension ``d`` is in a list ``I_d`` of
global indices (in local order); the local shard is the row-major box
``I_0 x I_1 x ...``. The lists follow from the placements, applied mesh
dimension by mesh dimension from left to right with this rank's mesh
coordinate, exactly as DTensor itself cuts tensors (``Shard`` is
``torch.chunk``: uneven, possibly empty, chunks; ``_StridedShard``, which FSDP2
writes when it shards a dimension that another mesh dimension already shards,
interleaves). :func:`local_runs` turns the box into runs of consecutive
elements, each contiguous both in the local shard and in the flattened global
tensor; :func:`local_expert_ranges` intersects them with the experts' ranges of
the flattened global tensor (what :class:`excitation_dist.torch.ExpertSlice`
describes). No size is assumed: an FSDP shard may start or end inside an
expert, hold pieces of every expert (``Shard(1)``), or nothing.

The cutting itself is torch's (``Placement._local_shard_size_and_offset``,
checked for torch 2.13): this module only composes the lists and does integer
arithmetic on them.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Sequence

from excitation_dist.segments import ExpertRange


class PlacementError(ValueError):
    """A placement the adapter cannot map to expert segments."""


def placement_name(placement) -> str:
    return repr(placement) if type(placement).__name__ != "Shard" else f"Shard({placement.dim})"


def shard_indices(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
                  placements: Sequence) -> list[list[int]]:
    """Per tensor dimension, the global indices this rank holds, in local order.

    ``coordinate`` is this rank's coordinate in the mesh (``mesh.get_coordinate()``).
    Raises :class:`PlacementError` for ``Partial`` (pending reductions: the local
    values are not the parameter's elements) and for placements it does not know.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

    index = [list(range(n)) for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Partial):
            raise PlacementError(f"{placement!r} on mesh dimension {mesh_dim}: a parameter with pending "
                                 "reductions holds no elements of its own to update")
        if isinstance(placement, _StridedShard):
            size, offsets = placement._local_shard_size_and_offset(
                len(index[placement.dim]), mesh_shape[mesh_dim], coordinate[mesh_dim],
                offset_mode=_StridedShardOffsetMode.ALL)
            picked = list(offsets) if size else []
        elif isinstance(placement, Shard):
            size, offset = placement._local_shard_size_and_offset(
                len(index[placement.dim]), mesh_shape[mesh_dim], coordinate[mesh_dim])
            picked = list(range(offset, offset + size))
        else:
            raise PlacementError(f"{placement!r} on mesh dimension {mesh_dim} is not Shard, _StridedShard or "
                                 "Replicate")
        current = index[placement.dim]
        index[placement.dim] = [current[i] for i in picked]
    return index


def local_runs(global_shape: Sequence[int], index: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """The local shard described by ``index`` (:func:`shard_indices`) as runs
    ``(local start, global start, length)`` in flattened (row-major) coordinates,
    in local order, each contiguous in both; adjacent runs are merged."""
    ndim = len(global_shape)
    if any(len(ix) == 0 for ix in index):
        return []
    # Trailing dimensions held whole and in order are contiguous: fold them into the run length.
    k, inner = ndim - 1, 1
    while k >= 0 and list(index[k]) == list(range(global_shape[k])):
        inner *= global_shape[k]
        k -= 1
    if k < 0:
        return [(0, 0, inner)]
    strides = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    runs_k: list[list[int]] = []  # (first global index along dim k, count)
    for i in index[k]:
        if runs_k and runs_k[-1][0] + runs_k[-1][1] == i:
            runs_k[-1][1] += 1
        else:
            runs_k.append([i, 1])
    out: list[tuple[int, int, int]] = []
    local = 0
    for outer in itertools.product(*index[:k]):
        base = sum(i * strides[d] for d, i in enumerate(outer))
        for first, count in runs_k:
            start, length = base + first * strides[k], count * inner
            if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == start:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + length)
            else:
                out.append((local, start, length))
            local += length
    return out


def local_expert_ranges(runs: Sequence[tuple[int, int, int]], experts: Sequence[ExpertRange]) -> list[ExpertRange]:
    """Intersect the runs of a local shard with the experts' ranges of the
    flattened global tensor; returns the pieces in local-shard coordinates
    (adjacent pieces of one expert merged)."""
    experts = sorted(experts, key=lambda r: r.start)
    starts = [r.start for r in experts]
    out: list[ExpertRange] = []
    for local, start, length in runs:
        end = start + length
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(experts) and experts[i].start < end:
            r = experts[i]
            lo, hi = max(r.start, start), min(r.end, end)
            if lo < hi:
                piece = ExpertRange(r.expert, lo - start + local, hi - start + local)
                if out and out[-1].expert == piece.expert and out[-1].end == piece.start:
                    out[-1] = ExpertRange(piece.expert, out[-1].start, piece.end)
                else:
                    out.append(piece)
            i += 1
    return out


def split_experts(runs: Sequence[tuple[int, int, int]], experts: Sequence[ExpertRange]) -> list[int]:
    """Experts of which the runs hold some elements but not all (sorted)."""
    held: dict[int, int] = {}
    for piece in local_expert_ranges(runs, experts):
        held[piece.expert] = held.get(piece.expert, 0) + piece.end - piece.start
    size: dict[int, int] = {}
    for r in experts:
        size[r.expert] = size.get(r.expert, 0) + r.end - r.start
    return sorted(e for e, n in held.items() if n != size[e])

"""Update blending on expert slices, vectorized: new = old + phi * (stepped - old).

Segments of one tensor that are back to back and equally long (the experts of
a stacked weight, the rows of a linear layer, the whole experts inside a ZeRO
partition) form one :class:`SegmentBlock`, viewed as ``[n, length]``. Per step
a block costs a handful of tensor operations however many experts it holds,
and only the rows whose multiplier differs from 1 are copied (the blend then
works in place, run by run, with no further copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch


class _Segment(Protocol):
    tensor: torch.Tensor
    start: int
    end: int
    layer: int
    expert: int


@dataclass
class SegmentBlock:
    """``n`` consecutive segments of ``length`` elements from ``start`` in
    ``tensor.view(-1)``; row i belongs to (layer_N[i], expert_N[i])."""

    tensor: torch.Tensor
    start: int
    length: int
    layer_N: torch.Tensor  # int64, CPU
    expert_N: torch.Tensor  # int64, CPU

    @property
    def n(self) -> int:
        return self.layer_N.numel()

    def rows(self) -> torch.Tensor:
        """The block as a ``[n, length]`` view of the tensor's storage."""
        return self.tensor.detach().view(-1)[self.start : self.start + self.n * self.length].view(self.n, self.length)


def build_blocks(segments: Iterable[_Segment]) -> list[SegmentBlock]:
    """Group segments into blocks (segments of one tensor must not overlap)."""
    by_tensor: dict[int, list[_Segment]] = {}
    for s in segments:
        by_tensor.setdefault(id(s.tensor), []).append(s)
    blocks = []
    for group in by_tensor.values():
        group.sort(key=lambda s: s.start)
        for prev, cur in zip(group, group[1:]):
            if cur.start < prev.end:
                raise ValueError(f"expert segments overlap: [{prev.start}, {prev.end}) and [{cur.start}, {cur.end})")
        run: list[_Segment] = []
        for s in group + [None]:  # type: ignore[list-item]
            if run and (s is None or s.start != run[-1].end or s.end - s.start != run[0].end - run[0].start):
                blocks.append(SegmentBlock(run[0].tensor, run[0].start, run[0].end - run[0].start,
                                           torch.tensor([r.layer for r in run]), torch.tensor([r.expert for r in run])))
                run = []
            if s is not None:
                run.append(s)
    return blocks


@dataclass
class Snapshot:
    """A block's pre-step values of the rows to blend, packed, with ``1 - phi``
    per packed row. ``runs``: (first row, row count, packed offset) of each run
    of consecutive rows to blend (None: the whole block, one run)."""

    block: SegmentBlock
    runs: list[tuple[int, int, int]] | None
    one_minus_phi_S1: torch.Tensor
    old_SL: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.old_SL.numel() * self.old_SL.element_size()


def _runs(keep_N: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of True in ``keep_N`` as (first, count, packed offset)."""
    rows = keep_N.nonzero().squeeze(1).tolist()
    runs: list[tuple[int, int, int]] = []
    for packed, r in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][1] == r:
            first, count, offset = runs[-1]
            runs[-1] = (first, count + 1, offset)
        else:
            runs.append((r, 1, packed))
    return runs


def snapshot(block: SegmentBlock, phi_LE: torch.Tensor) -> Snapshot | None:
    """Copy the block's rows whose multiplier is not 1 (None if there are none).
    The copy is the only transient memory of the blend path: :func:`blend`
    works in place on views of each run."""
    phi_N = phi_LE[block.layer_N, block.expert_N].cpu()
    keep = phi_N != 1.0
    if not bool(keep.any()):
        return None
    view = block.rows()
    if bool(keep.all()):
        runs, old = None, view.clone()
    else:
        runs = _runs(keep)
        if len(runs) == 1:
            first, count, _ = runs[0]
            old = view[first : first + count].clone()
        else:
            old = view.index_select(0, keep.nonzero().squeeze(1).to(view.device))
        phi_N = phi_N[keep]
    return Snapshot(block, runs, (1.0 - phi_N).to(view.device, view.dtype).unsqueeze(1), old)


def blend(snap: Snapshot) -> None:
    """After the optimizer step: rows <- old + phi * (stepped - old), computed in
    place as stepped + (1 - phi) * (old - stepped) (one pass; phi = 0 gives old
    exactly), run by run on views: no temporary copies."""
    view = snap.block.rows()
    if snap.runs is None:
        view.lerp_(snap.old_SL, snap.one_minus_phi_S1)
        return
    for first, count, offset in snap.runs:
        view[first : first + count].lerp_(snap.old_SL[offset : offset + count],
                                          snap.one_minus_phi_S1[offset : offset + count])

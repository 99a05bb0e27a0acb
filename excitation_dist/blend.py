"""The blend path: new = old + phi * (stepped - old) on expert rows, for any optimizer.

Before the base optimizer's step, every expert row of the tensors it is about to
step is copied into one packed buffer per dtype (one row operation for all blocks:
:mod:`excitation_dist.rows`); after it, the rows are blended in place,
``stepped + (1 - phi) * (old - stepped)`` (torch's ``lerp``: phi = 0 gives ``old``
exactly, phi = 1 leaves the stepped value untouched). Two row operations and one
allocation per dtype per optimizer call, however many layers and experts.

Which rows to copy is decided without looking at the multipliers (a selection of
the rows with phi != 1 would need them on the host: a sync per step), so the
transient memory is one copy of the owned expert rows the call steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from excitation_dist.rows import RowBlocks, RowPlan, local_tensor


@dataclass
class Snapshot:
    """The packed pre-step rows (``buffers``, one per dtype) and the blend that restores
    them (``rows``: blocks of the stepped tensors read from the buffers)."""

    buffers: list[torch.Tensor]
    rows: RowBlocks

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def snapshot(plan: RowPlan, stepped: Iterable[torch.Tensor], factors_R: torch.Tensor) -> Snapshot | None:
    """Copy every expert row of the tensors in ``stepped`` that the plan holds (None if none).
    ``factors_R``: this step's row factors (:meth:`RowPlan.factors`; the copy does not read them)."""
    layouts = [plan.tensors[id(t)] for t in stepped if t in plan]
    if not layouts:
        return None
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for layout in layouts:
        local = local_tensor(layout.tensor)
        key = (local.dtype, local.device)
        sizes[key] = sizes.get(key, 0) + sum(n * length for _, n, length, _ in layout.blocks)
    buffers = {key: torch.empty(size, dtype=key[0], device=key[1]) for key, size in sizes.items()}
    copy, restore, offsets = RowBlocks(), RowBlocks(), dict.fromkeys(buffers, 0)
    for layout in layouts:
        local = local_tensor(layout.tensor)
        key = (local.dtype, local.device)
        for start, n, length, first in layout.blocks:
            copy.add(buffers[key], offsets[key], n, length, first, y=local, y_start=start)
            restore.add(local, start, n, length, first, y=buffers[key], y_start=offsets[key])
            offsets[key] += n * length
    copy.apply("copy", factors_R)
    return Snapshot(list(buffers.values()), restore)


def blend(snap: Snapshot, factors_R: torch.Tensor) -> None:
    """After the optimizer step: rows <- old + phi * (stepped - old), in place."""
    snap.rows.apply("lerp", 1.0 - factors_R)

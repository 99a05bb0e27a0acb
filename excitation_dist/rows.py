"""Per-row factors on many expert blocks at once: the operation both update paths share.

An expert block is ``n`` rows of ``length`` elements, back to back from element
``start`` of a tensor's flat view; row ``r`` belongs to one (layer, expert) and takes
factor ``factors_R[first + r]``, gathered once per step from the ``[L, E]``
multipliers on their device. :class:`RowBlocks` lists the blocks of one step's call,
each as ``x`` (the tensor written) and ``y`` (the tensor read, at its own offset),
and :meth:`RowBlocks.apply` runs one of

* ``scale``:      ``x *= f``                (decoupled weight decay, Adam's denominator)
* ``add_scaled``: ``x += alpha * (y * f)``  (SGD's update)
* ``lerp``:       ``x += f * (y - x)``      (the blend: f = 1 - phi)
* ``copy``:       ``x = y``                 (the blend's snapshot; f unused)

on every block as ONE dispatched operation, however many layers and experts there
are: the torch custom operator ``excitation_dist::rows_``. On CUDA with Triton
installed it is one kernel launch per dtype over a table of the blocks' addresses
(:mod:`excitation_dist.triton_rows`). torch's own multi-tensor ops cannot do that:
a ``[n, 1]`` factor broadcast against ``[n, length]`` rows takes their slow path,
one launch per block. Elsewhere (CPU, or CUDA without Triton) the operator runs
torch ``_foreach`` ops over views of the blocks.

``add_scaled`` on CPU multiplies into a transient copy of the rows, so that a factor
of exactly 1 reproduces ``x.add_(y, alpha=alpha)`` bit for bit (``addcmul_`` rounds
differently); the Triton kernel needs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

MODES = ("scale", "add_scaled", "lerp", "copy")
_FIELDS = 7  # x tensor, x start, y tensor, y start, n, length, first factor row


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` that this rank holds and updates: a DTensor's local
    shard (``_local_tensor``, the storage its in-place ops write), any other
    tensor itself. Segment offsets, snapshots, blends and the folded update all
    address this tensor, so sharded parameters (FSDP2, expert parallel on a
    DeviceMesh) are updated on their local shard with no communication."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


class _Segment(Protocol):
    tensor: torch.Tensor
    start: int
    end: int
    layer: int
    expert: int


@dataclass
class SegmentBlock:
    """``n`` consecutive segments of ``length`` elements from ``start`` in
    ``local_tensor(tensor).view(-1)``; row i belongs to (layer_N[i], expert_N[i])."""

    tensor: torch.Tensor
    start: int
    length: int
    layer_N: torch.Tensor  # int64, CPU
    expert_N: torch.Tensor  # int64, CPU

    @property
    def n(self) -> int:
        return self.layer_N.numel()


def build_blocks(segments: Iterable[_Segment]) -> list[SegmentBlock]:
    """Group segments into blocks: segments of one tensor that are back to back and
    equally long (the experts of a stacked weight, the whole experts inside a ZeRO
    partition) form one block (segments of one tensor must not overlap)."""
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


@dataclass(frozen=True)
class TensorRows:
    """One stepped tensor's expert blocks ``(start, n, length, first factor row)`` and the
    elements between them (``gaps``: ``(start, length)``, at multiplier 1)."""

    tensor: torch.Tensor
    blocks: tuple[tuple[int, int, int, int], ...]
    gaps: tuple[tuple[int, int], ...]


class RowPlan:
    """Per stepped tensor (by ``id``), its :class:`TensorRows`; and the ``(layer, expert)``
    of every block row as one device index into the flattened ``[L, E]`` multipliers
    (row ``R``, one past the last, is the gaps' multiplier 1: :meth:`factors`)."""

    def __init__(self, blocks: Iterable[SegmentBlock], num_experts: int) -> None:
        by_tensor: dict[int, list[SegmentBlock]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for block in blocks:
            by_tensor.setdefault(id(block.tensor), []).append(block)
            tensors[id(block.tensor)] = block.tensor
        self.tensors: dict[int, TensorRows] = {}
        flat_index, rows = [], 0
        for key, tensor_blocks in by_tensor.items():
            tensor_blocks.sort(key=lambda b: b.start)
            spans, gaps, cursor = [], [], 0
            for b in tensor_blocks:
                if b.start > cursor:
                    gaps.append((cursor, b.start - cursor))
                spans.append((b.start, b.n, b.length, rows))
                flat_index.append(b.layer_N * num_experts + b.expert_N)
                rows += b.n
                cursor = b.start + b.n * b.length
            numel = local_tensor(tensors[key]).numel()
            if cursor < numel:
                gaps.append((cursor, numel - cursor))
            self.tensors[key] = TensorRows(tensors[key], tuple(spans), tuple(gaps))
        self.num_rows = rows
        index = torch.cat(flat_index) if flat_index else torch.zeros(0, dtype=torch.int64)
        device = local_tensor(next(iter(tensors.values()))).device if tensors else torch.device("cpu")
        self.row_index_R = index.to(device)  # uploaded once, when the segments are set

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.tensors

    def factors(self, phi_LE: torch.Tensor) -> torch.Tensor:
        """float64 ``[R + 1]``: each block row's multiplier, then 1 (the gaps'), on phi's device."""
        phi_R = phi_LE.reshape(-1).index_select(0, self.row_index_R.to(phi_LE.device))
        return torch.cat([phi_R, phi_R.new_ones(1)])


@dataclass
class RowBlocks:
    """Blocks of one row operation: ``xs`` / ``ys`` the distinct tensors written / read,
    ``desc`` seven ints per block (x index, x start, y index, y start, n, length, first)."""

    xs: list[torch.Tensor] = field(default_factory=list)
    ys: list[torch.Tensor] = field(default_factory=list)
    desc: list[int] = field(default_factory=list)
    _positions: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)  # ("x"/"y", id) -> index

    def add(self, x: torch.Tensor, x_start: int, n: int, length: int, first: int,
            y: torch.Tensor | None = None, y_start: int | None = None) -> None:
        """One block: rows ``[x_start, x_start + n * length)`` of ``x``'s flat view, read
        from ``y`` (default ``x``) at ``y_start`` (default ``x_start``)."""
        y = x if y is None else y
        self.desc += [self._index("x", self.xs, x), x_start, self._index("y", self.ys, y),
                      x_start if y_start is None else y_start, n, length, first]

    def _index(self, side: str, tensors: list[torch.Tensor], t: torch.Tensor) -> int:
        """``t``'s position in ``tensors`` (appended if new): one dict lookup per block, not a scan."""
        key = (side, id(t))
        if key not in self._positions:
            self._positions[key] = len(tensors)
            tensors.append(t)
        return self._positions[key]

    def __len__(self) -> int:
        return len(self.desc) // _FIELDS

    def apply(self, mode: str, factors_R: torch.Tensor, alpha: float = 1.0) -> None:
        if self.desc:
            _rows(self.xs, self.ys, self.desc, factors_R, MODES.index(mode), float(alpha))


def _views(xs, ys, desc):
    """(x views, y views, firsts) of every block, ``[n, length]`` each."""
    flat_x = [x.view(-1) for x in xs]
    flat_y = [y.view(-1) for y in ys]
    vx, vy, firsts = [], [], []
    for b in range(0, len(desc), _FIELDS):
        xi, xs_, yi, ys_, n, length, first = desc[b : b + _FIELDS]
        vx.append(flat_x[xi][xs_ : xs_ + n * length].view(n, length))
        vy.append(flat_y[yi][ys_ : ys_ + n * length].view(n, length))
        firsts.append(first)
    return vx, vy, firsts


def _columns(factors_R: torch.Tensor, firsts: list[int], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``[n, 1]`` factor column of each block, in the block's dtype (views of one cast per dtype)."""
    cast: dict[torch.dtype, torch.Tensor] = {}  # dtype -> the factors as one [R, 1] column
    out = []
    for first, x in zip(firsts, rows):
        if x.dtype not in cast:
            cast[x.dtype] = factors_R.to(x.dtype).unsqueeze(1)
        out.append(cast[x.dtype][first : first + x.shape[0]])
    return out


@torch.library.custom_op("excitation_dist::rows_", mutates_args={"xs"})
def _rows(xs: list[torch.Tensor], ys: list[torch.Tensor], desc: list[int], factors_R: torch.Tensor,
          mode: int, alpha: float) -> None:
    if xs[0].is_cuda:
        from excitation_dist import triton_rows

        if triton_rows.available():
            triton_rows.launch(MODES[mode], xs, ys, desc, factors_R, alpha)
            return
    vx, vy, firsts = _views(xs, ys, desc)
    if mode == 3:
        torch._foreach_copy_(vx, vy)
        return
    columns = _columns(factors_R, firsts, vx)
    if mode == 0:
        torch._foreach_mul_(vx, columns)
    elif mode == 1:
        torch._foreach_add_(vx, torch._foreach_mul(vy, columns), alpha=alpha)
    else:
        torch._foreach_lerp_(vx, vy, columns)

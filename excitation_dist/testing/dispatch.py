"""Count the tensor operations a region dispatches, and the kernels a GPU would launch for them.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op, on
the CPU too. On a GPU each op that computes is one kernel launch from Python (about
10-20 us of host time), except torch's multi-tensor (``_foreach_*``) ops, which
launch a handful of kernels for a whole list *only* on their fast path: every
tensor dense and non-overlapping, one dtype and device, and paired tensor lists of
equal sizes and strides (an ``[n, 1]`` factor broadcast against ``[n, length]``
rows, or a 0-dim tensor against a matrix, falls to the slow path: one kernel per
tensor). So a CPU count means what a GPU pays when it is read through
:attr:`DispatchCounts.gpu_launches`, which applies those rules.

    with count_dispatches() as counts:
        optimizer.step()
    counts.ops, counts.gpu_launches, counts.by_name.most_common(5)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view or read metadata: no kernel on a GPU.
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "slice", "select", "as_strided", "expand", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "detach", "alias", "lift_fresh", "_reshape_alias", "split", "split_with_sizes",
    "unbind", "narrow", "view_as_real", "view_as_complex", "_to_copy_noop", "is_same_size", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense",
}


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_non_overlapping_and_dense()


def _foreach_fast_path(args: tuple) -> bool:
    """torch's multi-tensor fast-path rules (``check_fast_path_restrictions``), on the op's arguments."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return True
    first = lists[0]
    dtype, device = first[0].dtype, first[0].device
    for tensors in lists:
        if len(tensors) != len(first):
            return False
        for t, ref in zip(tensors, first):
            if t.dtype != dtype or t.device != device or not _dense(t):
                return False
            if t.shape != ref.shape or t.stride() != ref.stride():
                return False
    for a in args:  # a tensor scalar must be one element on the lists' device, or a CPU scalar
        if isinstance(a, torch.Tensor) and a.numel() != 1:
            return False
    return True


def _list_length(args: tuple) -> int:
    for a in args:
        if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            return len(a)
    return 1


@dataclass
class DispatchCounts:
    """``ops``: aten ops dispatched; ``gpu_launches``: kernels a GPU would launch
    for them (view ops none, a foreach op on its fast path one, off it one per
    tensor); ``by_name``: ops per aten name; ``slow_foreach``: foreach ops off the
    fast path, by name."""

    ops: int = 0
    gpu_launches: int = 0
    by_name: Counter = field(default_factory=Counter)
    slow_foreach: Counter = field(default_factory=Counter)


class DispatchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts = DispatchCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        c = self.counts
        c.ops += 1
        c.by_name[name] += 1
        if name.startswith("_foreach_"):
            if _foreach_fast_path(tuple(args) + tuple(kwargs.values())):
                c.gpu_launches += 1
            else:
                c.gpu_launches += _list_length(tuple(args))
                c.slow_foreach[name] += 1
        elif name not in _NO_KERNEL:
            c.gpu_launches += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_dispatches() -> Iterator[DispatchCounts]:
    """``with count_dispatches() as counts: ...``: the aten ops dispatched inside."""
    mode = DispatchCounter()
    with mode:
        yield mode.counts

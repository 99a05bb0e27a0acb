"""Count the operations that make the host wait for the device (host syncs).

On a GPU these stall the CPU's kernel queue: ``.item()`` / ``float(t)`` /
``bool(t)`` (``_local_scalar_dense``), device-to-host copies, and ops whose
output size depends on tensor values (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without an
output size). A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees
every aten op, on the CPU too, so a CPU test can prove that code adds none:
run the same step with and without it and compare the counts.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_VALUE_DEPENDENT = {
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "histc",
}


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class HostSyncCounter(TorchDispatchMode):
    """Records each host-syncing aten op by name (``counts``: a Counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _VALUE_DEPENDENT:
            self.counts[name] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and _is_bool_index(args[1] if len(args) > 1 else None):
            self.counts[f"{name}(bool mask)"] += 1
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_device = (args[0].device if name == "copy_" else kwargs.get("device")) or src.device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst_device).type == "cpu":
                self.counts["device-to-host copy"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """``with count_host_syncs() as syncs: ...`` then ``syncs`` maps op name -> calls."""
    mode = HostSyncCounter()
    with mode:
        yield mode.counts

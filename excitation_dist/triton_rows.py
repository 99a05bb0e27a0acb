"""One Triton kernel launch for a per-row-factor operation over many expert blocks.

The CUDA implementation of :mod:`excitation_dist.rows`: every block's write and read
addresses, element count, row length and first factor row go in five int64 tables
(built once per set of blocks and kept on the device: blocks are slices of tensors
that live for the whole run, so the same tables serve every step), and a 2-D grid
(block, chunk) applies

* ``scale``:      ``x *= f``
* ``add_scaled``: ``x += alpha * (y * f)``
* ``lerp``:       ``x += f * (y - x)`` (torch's formula: exact at f = 0 and f = 1)
* ``copy``:       ``x = y``

with ``f = factors_R[first + element // length]`` cast to the block's dtype, as the
CPU implementation does. Nothing is read back on the host.

Tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``) against the
definition (tests/test_rows.py); its speed on a GPU is for ``make gpu-check``.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict

import torch

_MODE_CODES = {"scale": 0, "add_scaled": 1, "lerp": 2, "copy": 3}
BLOCK = 1024
MAX_CHUNK_PROGRAMS = 4096  # the grid's second dimension; each program strides over the rest of its block
_TABLES: "OrderedDict[tuple, tuple[torch.Tensor, ...]]" = OrderedDict()
_TABLES_KEPT = 64
_FIELDS = 7


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rows_kernel(x_addr, y_addr, numels, lengths, firsts, factors, alpha,
                    MODE: tl.constexpr, ELEM: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        n = tl.load(numels + b)
        length = tl.load(lengths + b)
        first = tl.load(firsts + b)
        x_base = tl.load(x_addr + b).to(tl.pointer_type(ELEM))
        y_base = tl.load(y_addr + b).to(tl.pointer_type(ELEM))
        for start in range(tl.program_id(1) * BLOCK, n, tl.num_programs(1) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            if MODE == 3:
                r = tl.load(y_base + offs, mask=mask)
            else:
                f = tl.load(factors + first + offs // length, mask=mask, other=0.0).to(ELEM)
                x = tl.load(x_base + offs, mask=mask)
                if MODE == 0:
                    r = x * f
                elif MODE == 1:
                    r = x + alpha * (tl.load(y_base + offs, mask=mask) * f)
                else:  # torch's lerp: exact at both ends (f = 0 keeps x, f = 1 gives y)
                    y = tl.load(y_base + offs, mask=mask)
                    r = tl.where(f < 0.5, x + f * (y - x), y - (y - x) * (1.0 - f))
            tl.store(x_base + offs, r.to(ELEM), mask=mask)

    return rows_kernel


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, set before Triton is imported): tests only."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _elem(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def tables(key: tuple, columns: tuple[list[int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """int64 device tables of ``columns``, kept for the next call with the same ``key`` (the same blocks).

    A new key (new blocks, or gradients reallocated at new addresses) uploads from pinned
    host memory without blocking the host; the pinned copies live as long as the entry."""
    entry = _TABLES.get(key)
    if entry is None:
        host = [torch.tensor(c, dtype=torch.int64) for c in columns]
        if device.type == "cuda":
            host = [h.pin_memory() for h in host]
        entry = (tuple(h.to(device, non_blocking=True) for h in host), host)
        _TABLES[key] = entry
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return entry[0]


def launch(mode: str, xs: list[torch.Tensor], ys: list[torch.Tensor], desc: list[int],
           factors_R: torch.Tensor, alpha: float) -> None:
    """Apply ``mode`` to every block of ``desc`` (see :class:`excitation_dist.rows.RowBlocks`):
    one launch per dtype among the blocks."""
    for t in (*xs, *ys):
        if not t.is_contiguous():
            raise ValueError("Triton row operations need contiguous tensors")
    by_dtype: dict[torch.dtype, tuple[list[int], ...]] = {}
    for b in range(0, len(desc), _FIELDS):
        xi, x_start, yi, y_start, n, length, first = desc[b : b + _FIELDS]
        x, y = xs[xi], ys[yi]
        if y.dtype != x.dtype:
            raise ValueError(f"a row block reads {y.dtype} into {x.dtype}")
        cols = by_dtype.setdefault(x.dtype, ([], [], [], [], []))
        cols[0].append(x.data_ptr() + x_start * x.element_size())
        cols[1].append(y.data_ptr() + y_start * y.element_size())
        cols[2].append(n * length)
        cols[3].append(length)
        cols[4].append(first)
    kernel = _kernel()
    for dtype, cols in by_dtype.items():
        key = (xs[0].device, dtype, *(tuple(c) for c in cols))
        x_addr, y_addr, numels, lengths, firsts = tables(key, cols, xs[0].device)
        chunks = min(MAX_CHUNK_PROGRAMS, max(1, -(-max(cols[2]) // BLOCK)))
        kernel[(len(cols[0]), chunks)](x_addr, y_addr, numels, lengths, firsts, factors_R, float(alpha),
                                       MODE=_MODE_CODES[mode], ELEM=_elem(dtype), BLOCK=BLOCK)

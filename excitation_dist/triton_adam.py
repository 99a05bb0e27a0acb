"""The folded Adam step of all excited tensors of a parameter group as ONE Triton launch.

The CUDA implementation of :func:`excitation_dist.folded.adam_group` and
:func:`~excitation_dist.folded.fused_adam_group`: a 2-D grid (block, chunk) over a
table of every expert block and gap of the group's excited tensors (addresses of
the parameter, gradient and both moments, element count, row length, first factor
row; gaps take the extra factor row, 1) reads each element once, updates the moments
in place and writes the parameter stepped at ``lr * f``, with
``f = factors_R[first + element // length]``. Nothing is allocated (the torch ops
of the CPU path allocate the denominators), nothing is read back on the host, and
the number of launches does not depend on layers or experts.

Two formulas, per element in float32:

* ``torch`` (torch.optim.Adam / AdamW): decoupled ``p *= 1 - lr * wd * f`` (else
  ``g += wd * p``); ``m += (1 - beta1) * (g - m)``; ``v = beta2 * v + (1 - beta2) * g * g``;
  ``p -= (lr / bc1) * f * m / (sqrt(v) / sqrt(bc2) + eps)``.
* ``fused`` (DeepSpeed / apex / Transformer Engine FusedAdam, :mod:`excitation_dist.fused_adams`):
  ``update = (m / bc1) / (sqrt(v / bc2) + eps)`` (+ ``wd * p`` when decoupled);
  ``p -= lr * f * update``.

Equal to the torch ops of the CPU path to float32 rounding (a kernel keeps its
intermediates in registers). Tested on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, tests/test_triton_adam.py); its speed is for ``make gpu-check``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from excitation_dist import triton_rows

BLOCK = 1024
MAX_CHUNK_PROGRAMS = 4096


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adam_kernel(p_addr, g_addr, m_addr, v_addr, numels, lengths, firsts, factors,
                    lr, beta1, beta2, eps, wd, bc1, bc2,
                    DECOUPLED: tl.constexpr, TORCH: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        n = tl.load(numels + b)
        length = tl.load(lengths + b)
        first = tl.load(firsts + b)
        p_base = tl.load(p_addr + b).to(tl.pointer_type(tl.float32))
        g_base = tl.load(g_addr + b).to(tl.pointer_type(tl.float32))
        m_base = tl.load(m_addr + b).to(tl.pointer_type(tl.float32))
        v_base = tl.load(v_addr + b).to(tl.pointer_type(tl.float32))
        for start in range(tl.program_id(1) * BLOCK, n, tl.num_programs(1) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            f = tl.load(factors + first + offs // length, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(p_base + offs, mask=mask)
            g = tl.load(g_base + offs, mask=mask)
            m = tl.load(m_base + offs, mask=mask)
            v = tl.load(v_base + offs, mask=mask)
            if not DECOUPLED:
                g = g + wd * p
            if TORCH:
                if DECOUPLED:
                    p = p * (1.0 - lr * wd * f)
                m = m + (1.0 - beta1) * (g - m)
                v = v * beta2 + (1.0 - beta2) * g * g
                p = p - (lr / bc1) * f * (m / (tl.sqrt(v) / bc2 + eps))
            else:
                m = beta1 * m + (1.0 - beta1) * g
                v = beta2 * v + (1.0 - beta2) * g * g
                update = (m / bc1) / (tl.sqrt(v / bc2) + eps)
                if DECOUPLED:
                    update = update + wd * p
                p = p - lr * f * update
            tl.store(p_base + offs, p, mask=mask)
            tl.store(m_base + offs, m, mask=mask)
            tl.store(v_base + offs, v, mask=mask)

    return adam_kernel


def usable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can step these (parameters, gradients, moments): CUDA (or the
    interpreter), float32, contiguous, Triton importable."""
    if not tensors or not (all(t.is_cuda for t in tensors) or triton_rows.interpreted()):
        return False  # the CPU path never imports Triton
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and triton_rows.available()


def launch(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
           exp_avg_sqs: Sequence[torch.Tensor], spans: Sequence[Sequence[tuple[int, int, int, int]]],
           factors_R: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           correction1: float, correction2: float, decoupled: bool, formula: str) -> None:
    """One launch over ``spans[i]`` = ``(start, numel, row length, first factor row)`` of tensor i
    (its expert blocks and its gaps, which together cover it). ``correction2`` is ``1 - beta2**t``;
    the torch formula divides by its square root, the fused one by itself, as each optimizer does."""
    cols: tuple[list[int], ...] = ([], [], [], [], [], [], [])
    for p, g, m, v, tensor_spans in zip(params, grads, exp_avgs, exp_avg_sqs, spans):
        for start, numel, length, first in tensor_spans:
            offset = start * 4  # float32
            cols[0].append(p.data_ptr() + offset)
            cols[1].append(g.data_ptr() + offset)
            cols[2].append(m.data_ptr() + offset)
            cols[3].append(v.data_ptr() + offset)
            cols[4].append(numel)
            cols[5].append(length)
            cols[6].append(first)
    if not cols[0]:
        return
    device = params[0].device
    tables = triton_rows.tables(("adam", device, *(tuple(c) for c in cols)), cols, device)
    chunks = min(MAX_CHUNK_PROGRAMS, max(1, -(-max(cols[4]) // BLOCK)))
    bc2 = correction2**0.5 if formula == "torch" else correction2
    _kernel()[(len(cols[0]), chunks)](*tables, factors_R, float(lr), float(beta1), float(beta2), float(eps),
                                      float(weight_decay), float(correction1), float(bc2),
                                      DECOUPLED=bool(decoupled), TORCH=formula == "torch", BLOCK=BLOCK)

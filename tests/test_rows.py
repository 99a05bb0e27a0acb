"""The per-row-factor operation both update paths use (excitation_dist.rows): one
dispatched op for any number of blocks, against a per-row Python reference; the
Triton kernel (the CUDA implementation) through Triton's CPU interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from excitation_dist.rows import RowBlocks
from excitation_dist.testing.dispatch import count_dispatches

FACTORS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 0.25, 1.0, 4.0, 0.75], dtype=torch.float64)


def _problem(dtype=torch.float64, seed=0):
    """Three blocks: two in one flat tensor (a ZeRO-style partition with gaps), one a whole
    tensor; y at other offsets (a packed buffer)."""
    g = torch.Generator().manual_seed(seed)
    flat, whole = torch.randn(80, generator=g, dtype=dtype), torch.randn(3, 5, generator=g, dtype=dtype)
    packed = torch.randn(24 + 18 + 15, generator=g, dtype=dtype)
    blocks = [(flat, 3, 4, 6, 0, 0), (flat, 40, 2, 9, 4, 24), (whole, 0, 3, 5, 7, 42)]  # x, start, n, len, first, y_start
    return flat, whole, packed, blocks


def _run(mode, dtype=torch.float64, seed=0, apply=True):
    flat, whole, packed, blocks = _problem(dtype, seed)
    expected = {id(flat): flat.clone(), id(whole): whole.clone()}
    for x, start, n, length, first, y_start in blocks:
        view = expected[id(x)].view(-1)[start : start + n * length].view(n, length)
        y = packed[y_start : y_start + n * length].view(n, length)
        f = FACTORS[first : first + n].to(dtype).unsqueeze(1)
        if mode == "scale":
            view.copy_(view * f)
        elif mode == "add_scaled":
            view.copy_(view + -0.1 * (y * f))
        elif mode == "lerp":
            view.copy_(view + f * (y - view))
        else:
            view.copy_(y)
    rb = RowBlocks()
    for x, start, n, length, first, y_start in blocks:
        rb.add(x, start, n, length, first, y=packed, y_start=y_start)
    return rb, (flat, whole), (expected[id(flat)], expected[id(whole)])


@pytest.mark.parametrize("mode", ["scale", "add_scaled", "lerp", "copy"])
def test_row_op_matches_the_per_row_definition_in_one_dispatch(mode):
    rb, got, want = _run(mode)
    with count_dispatches() as counts:
        rb.apply(mode, FACTORS, -0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-15, atol=1e-15)  # rows outside the blocks untouched too
    assert counts.ops == 1 and counts.gpu_launches == 1  # one custom op: one kernel on CUDA


def test_factor_one_is_bitwise_identity_and_a_zero_lerp_keeps_rows():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    before = x.clone()
    rb = RowBlocks()
    rb.add(x, 0, 4, 6, 0, y=y)
    rb.apply("scale", torch.ones(4, dtype=torch.float64))
    rb.apply("lerp", torch.zeros(4, dtype=torch.float64))
    assert torch.equal(x, before)
    rb.apply("add_scaled", torch.ones(4, dtype=torch.float64), -0.1)
    assert torch.equal(x, before.add(y, alpha=-0.1))  # the bits of torch's add_(y, alpha)


TRITON_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from excitation_dist import triton_rows
    from tests.test_rows import FACTORS, _run
    def check(mode, dtype, seed):
        rb, got, want = _run(mode, dtype, seed)
        triton_rows.launch(mode, rb.xs, rb.ys, rb.desc, FACTORS, -0.1)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    for dtype in (torch.float32, torch.float64):
        for mode in ("scale", "add_scaled", "lerp", "copy"):
            check(mode, dtype, 1)
    triton_rows.BLOCK, triton_rows.MAX_CHUNK_PROGRAMS = 8, 2  # several chunks per block, strided programs
    check("lerp", torch.float32, 2)
    print("ok")
""")


def run_in_triton_interpreter(script: str, timeout: int = 300) -> None:
    """Run ``script`` (which sets TRITON_INTERPRET=1 before importing Triton) in a fresh
    interpreter from the repository root; it must print "ok" last."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_triton_kernel_matches_the_definition_in_the_interpreter():
    run_in_triton_interpreter(TRITON_CHECK)

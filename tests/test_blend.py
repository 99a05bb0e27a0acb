"""Vectorized blending equals the per-segment definition, on layouts a ZeRO
partition produces (experts cut at both ends, several parameters in one buffer);
its only transient memory is the packed copy of the rows, and no host sync."""

import pytest
import torch

from excitation_dist import ExpertSegment
from excitation_dist.blend import blend, snapshot
from excitation_dist.rows import RowPlan, build_blocks
from excitation_dist.segments import owned_expert_ranges, stacked_expert_ranges
from excitation_dist.testing.dispatch import count_dispatches
from excitation_dist.testing.syncs import count_host_syncs


def _partition_segments(flat):
    """Two stacked parameters (4 experts x 6, 4 experts x 3) flattened back to back,
    of which this rank owns elements [4, 31): cuts through experts at both ends."""
    segments, offset, owned_lo, owned_hi = [], 0, 4, 31
    for layer, (numel, experts) in enumerate([(24, 4), (12, 4)]):
        lo, hi = max(owned_lo - offset, 0), min(owned_hi - offset, numel)
        if lo < hi:
            for r in owned_expert_ranges(stacked_expert_ranges(numel, experts), lo, hi, offset=offset + lo - owned_lo):
                segments.append(ExpertSegment(flat, r.start, r.end, layer, r.expert))
        offset += numel
    return segments


def test_blocks_of_a_partition_cut_through_experts():
    flat = torch.zeros(27, dtype=torch.float64)
    segments = _partition_segments(flat)
    assert [(s.layer, s.expert, s.start, s.end) for s in segments] == [
        (0, 0, 0, 2), (0, 1, 2, 8), (0, 2, 8, 14), (0, 3, 14, 20), (1, 0, 20, 23), (1, 1, 23, 26), (1, 2, 26, 27)]
    blocks = build_blocks(segments)
    assert [(b.start, b.length, b.n) for b in blocks] == [(0, 2, 1), (2, 6, 3), (20, 3, 2), (26, 1, 1)]


@pytest.mark.parametrize("phi_fill", ["mixed", "all_not_one", "all_one"])
def test_vectorized_blend_equals_per_segment_definition(phi_fill):
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(27, generator=g, dtype=torch.float64)
    segments = _partition_segments(flat)
    phi = torch.rand(2, 4, generator=g, dtype=torch.float64) * 2
    if phi_fill == "mixed":
        phi[0, 2] = 1.0
        phi[1, 0] = 0.0
    elif phi_fill == "all_one":
        phi.fill_(1.0)
    old = flat.clone()
    plan = RowPlan(build_blocks(segments), 4)
    factors = plan.factors(phi)
    with count_host_syncs() as syncs, count_dispatches() as ops:
        snap = snapshot(plan, [flat], factors)
    flat.add_(torch.randn(27, generator=g, dtype=torch.float64))  # the optimizer step
    stepped = flat.clone()
    with count_host_syncs() as more_syncs:
        blend(snap, factors)
    expected = stepped.clone()
    for s in segments:
        p = phi[s.layer, s.expert].item()
        expected[s.start:s.end] = old[s.start:s.end] + p * (stepped[s.start:s.end] - old[s.start:s.end])
    torch.testing.assert_close(flat, expected, rtol=1e-14, atol=1e-14)
    assert not syncs and not more_syncs  # which rows to copy is not decided on the host
    assert ops.ops <= 3  # one allocation, one copy over every block
    assert snap.nbytes == sum(s.end - s.start for s in segments) * 8  # every owned expert row, packed
    if phi_fill == "mixed":
        assert torch.equal(flat[20:23], old[20:23])  # phi = 0: exactly unchanged
    if phi_fill == "all_one":
        assert torch.equal(flat, stepped)  # phi = 1: the stepped value, bit for bit


def test_overlapping_segments_are_rejected():
    t = torch.zeros(8)
    with pytest.raises(ValueError, match="overlap"):
        build_blocks([ExpertSegment(t, 0, 4, 0, 0), ExpertSegment(t, 3, 8, 0, 1)])


def _allocated_bytes(fn) -> int:
    """Bytes torch's CPU allocator hands out during ``fn()`` (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.nbytes() > 0)


@pytest.mark.parametrize("pattern", ["alternating", "one_run", "all"])
def test_blend_allocates_nothing_beyond_the_snapshot(pattern):
    """The blend path's only transient memory is the packed snapshot of the rows:
    the blend itself works in place (no gathered copy)."""
    rows, length = 16, 4096
    flat = torch.randn(rows * length)
    segments = [ExpertSegment(flat, i * length, (i + 1) * length, 0, i) for i in range(rows)]
    phi = torch.full((1, rows), 1.0, dtype=torch.float64)
    if pattern == "alternating":
        phi[0, ::2] = 0.5
    elif pattern == "one_run":
        phi[0, 3:9] = 0.0
    else:
        phi.fill_(1.5)
    plan = RowPlan(build_blocks(segments), rows)
    factors = plan.factors(phi)
    old = flat.clone()
    snap = snapshot(plan, [flat], factors)
    assert snap.nbytes == rows * length * 4
    flat.add_(1.0)
    weights = 1.0 - factors  # computed before the measured call, as the update computes it once per step
    snap.rows.apply("lerp", weights)  # warm-up of the operator's first call
    flat.copy_(old + 1.0)
    # nothing the size of the rows: only the factors cast to the rows' dtype (one float per row)
    assert _allocated_bytes(lambda: snap.rows.apply("lerp", weights)) <= weights.numel() * 4
    expected = old + phi.float().repeat_interleave(length, dim=1).view(-1) * 1.0
    torch.testing.assert_close(flat, expected)

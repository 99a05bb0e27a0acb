"""Vectorized blending equals the per-segment definition, on layouts a ZeRO
partition produces (experts cut at both ends, several parameters in one buffer)."""

import pytest
import torch

from excitation_dist import ExpertSegment
from excitation_dist.blend import blend, build_blocks, snapshot
from excitation_dist.segments import owned_expert_ranges, stacked_expert_ranges


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
    snaps = [s for s in (snapshot(b, phi) for b in build_blocks(segments)) if s is not None]
    flat.add_(torch.randn(27, generator=g, dtype=torch.float64))  # the optimizer step
    stepped = flat.clone()
    for snap in snaps:
        blend(snap)
    expected = stepped.clone()
    for s in segments:
        p = phi[s.layer, s.expert].item()
        expected[s.start:s.end] = old[s.start:s.end] + p * (stepped[s.start:s.end] - old[s.start:s.end])
    torch.testing.assert_close(flat, expected, rtol=1e-14, atol=1e-14)
    copied = sum(sn.old_SL.numel() for sn in snaps)
    assert copied == sum(s.end - s.start for s in segments if phi[s.layer, s.expert] != 1)
    if phi_fill == "mixed":
        assert torch.equal(flat[20:23], old[20:23])  # phi = 0: exactly unchanged


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
    """The blend path's only transient memory is the snapshot of the rows with
    phi != 1: the blend itself works in place on views (no gathered copy)."""
    rows, length = 16, 4096
    flat = torch.randn(rows * length)
    segments = [ExpertSegment(flat, i * length, (i + 1) * length, 0, i) for i in range(rows)]
    phi = torch.full((1, rows), 1.0)
    if pattern == "alternating":
        phi[0, ::2] = 0.5
    elif pattern == "one_run":
        phi[0, 3:9] = 0.0
    else:
        phi.fill_(1.5)
    (block,) = build_blocks(segments)
    old = flat.clone()
    snap = snapshot(block, phi)
    assert snap.nbytes == int((phi != 1).sum()) * length * 4
    flat.add_(1.0)
    assert _allocated_bytes(lambda: blend(snap)) == 0
    expected = old + phi.repeat_interleave(length, dim=1).view(-1) * 1.0
    torch.testing.assert_close(flat, expected)

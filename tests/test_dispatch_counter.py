"""The dispatch counter that benchmarks/step_ops.py reads: every aten op counted, and
GPU launches estimated with torch's foreach fast-path rules."""

import torch

from excitation_dist.testing.dispatch import count_dispatches


def test_plain_ops_count_once_and_views_launch_nothing():
    x = torch.randn(4, 6)
    with count_dispatches() as c:
        y = x.view(-1)[2:10].view(2, 4)  # views only
        y.mul_(2.0).add_(1.0)
    assert c.ops == c.by_name["view"] + c.by_name["slice"] + 2
    assert c.gpu_launches == 2


def test_foreach_fast_path_is_one_launch_and_a_broadcast_falls_to_one_per_tensor():
    rows = [torch.randn(3, 5) for _ in range(7)]
    same = [torch.randn(3, 5) for _ in range(7)]
    column = [torch.randn(3, 1) for _ in range(7)]
    with count_dispatches() as fast:
        torch._foreach_mul_(rows, same)
        torch._foreach_add_(rows, 1.0)
    with count_dispatches() as slow:
        torch._foreach_mul_(rows, column)  # [3, 1] against [3, 5]: torch's slow path on CUDA
    assert (fast.ops, fast.gpu_launches) == (2, 2)
    assert (slow.ops, slow.gpu_launches) == (1, 7)
    assert slow.slow_foreach["_foreach_mul_"] == 1

"""The controller's step life cycle: counts, options, skipped steps, checkpoints."""

import pytest
import torch

from excitation_dist import Excitation, ExpertSegment


def _sgd_setup(config, L=1, E=2, numel=3):
    params = [torch.nn.Parameter(torch.zeros(E * numel, dtype=torch.float64)) for _ in range(L)]
    opt = torch.optim.SGD(params, lr=1.0)
    ex = Excitation(config, L, E, reduce=False)
    ex.set_segments(ExpertSegment(params[l], e * numel, (e + 1) * numel, l, e) for l in range(L) for e in range(E))
    ex.hook_optimizer(opt)
    return params, opt, ex


def _step(params, opt, ex, counts_LE):
    for l, row in enumerate(counts_LE):
        ex.record(l, torch.tensor(row))
    for p in params:
        p.grad = -torch.ones_like(p)  # SGD: every element moves by +lr
    opt.step()


def test_update_is_scaled_per_expert_slice():
    params, opt, ex = _sgd_setup({"strategy": "zerosum"})
    _step(params, opt, ex, [[3, 1]])
    assert params[0].tolist() == [1.5] * 3 + [0.5] * 3
    assert ex.last_counts_LE.tolist() == [[3, 1]]
    assert ex.last_multipliers_LE.tolist() == [[1.5, 0.5]]
    # counts restart every step
    _step(params, opt, ex, [[1, 1]])
    assert params[0].tolist() == [2.5] * 3 + [1.5] * 3


def test_blend_path_snapshots_every_owned_expert_row_without_reading_phi():
    """Which rows to copy is not decided on the host (that would be a sync per step):
    every owned expert row is copied, and the rows with phi = 1 blend back exactly."""
    params, opt, ex = _sgd_setup({"strategy": "positivesum", "update": "blend"}, E=2, numel=4)
    assert ex.update_path == "blend"
    _step(params, opt, ex, [[3, 1]])  # phi = (1.5, 1): both experts' 4 float64 elements copied
    assert ex.last_snapshot_bytes == 2 * 4 * 8
    assert params[0].tolist() == [1.5] * 4 + [1.0] * 4
    _step(params, opt, ex, [[1, 1]])
    assert ex.last_snapshot_bytes == 2 * 4 * 8 and ex.peak_snapshot_bytes == 2 * 4 * 8


def test_folded_path_copies_nothing():
    params, opt, ex = _sgd_setup({"strategy": "positivesum"}, E=2, numel=4)
    assert ex.update_path == "folded"
    _step(params, opt, ex, [[3, 1]])
    assert ex.last_snapshot_bytes == 0 and ex.peak_snapshot_bytes == 0
    assert params[0].tolist() == [1.5] * 4 + [1.0] * 4
    assert all(p.grad is not None for p in params)  # gradients handed back after the step


def test_skipped_step_applies_nothing_and_drops_its_counts():
    params, opt, ex = _sgd_setup({"strategy": "zerosum"})
    ex.record(0, torch.tensor([1, 0]))
    ex.skip_step()  # e.g. fp16 overflow: the framework never steps the optimizer
    _step(params, opt, ex, [[1, 1]])
    assert ex.last_counts_LE.tolist() == [[1, 1]]
    assert params[0].tolist() == [1.0] * 6
    assert ex.step == 1


def test_step_without_counts_keeps_multiplier_one():
    params, opt, ex = _sgd_setup({"strategy": "zerosum"})
    for p in params:
        p.grad = -torch.ones_like(p)
    opt.step()
    assert ex.last_multipliers_LE.tolist() == [[1.0, 1.0]]
    assert params[0].tolist() == [1.0] * 6


def test_wrapper_stepping_one_param_group_at_a_time():
    """ZeRO steps the base optimizer once per group: multipliers are computed once
    per step and each group's slices are blended when that group is stepped."""
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    ex = Excitation({"strategy": "zerosum"}, 2, 2, reduce=False)
    ex.set_segments([ExpertSegment(a, 0, 2, 0, 0), ExpertSegment(a, 2, 4, 0, 1),
                     ExpertSegment(b, 0, 2, 1, 0), ExpertSegment(b, 2, 4, 1, 1)])
    ex.hook_optimizer(opt, end_step_after=False)
    for step in range(2):
        ex.record(0, torch.tensor([3, 1]))
        ex.record(1, torch.tensor([1, 3]))
        a.grad, b.grad = -torch.ones(4, dtype=torch.float64), -torch.ones(4, dtype=torch.float64)
        all_groups = opt.param_groups
        for group in all_groups:
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = all_groups
        ex.end_step()
    assert a.tolist() == [3.0, 3.0, 1.0, 1.0] and b.tolist() == [1.0, 1.0, 3.0, 3.0]
    assert ex.step == 2


def test_counts_after_the_reduction_was_issued_are_refused():
    ex = Excitation({}, 1, 2, reduce=False)
    ex.record(0, torch.tensor([1, 1]))
    ex.reduce_counts_async()
    with pytest.raises(RuntimeError, match="after this step's count all-reduce"):
        ex.record(0, torch.tensor([1, 1]))


def test_warmup_ramps_from_one():
    params, opt, ex = _sgd_setup({"strategy": "zerosum", "warmup_steps": 2})
    seen = []
    for _ in range(4):
        _step(params, opt, ex, [[3, 1]])
        seen.append(ex.last_multipliers_LE[0].tolist())
    assert seen == [[1.0, 1.0], [1.25, 0.75], [1.5, 0.5], [1.5, 0.5]]


def test_utilization_ema_smooths_over_steps():
    params, opt, ex = _sgd_setup({"strategy": "zerosum", "utilization_ema": 0.5})
    _step(params, opt, ex, [[3, 1]])  # u = (.75, .25)
    assert ex.last_multipliers_LE[0].tolist() == [1.5, 0.5]
    _step(params, opt, ex, [[1, 3]])  # ema = (.5, .5)
    assert ex.last_multipliers_LE[0].tolist() == [1.0, 1.0]
    _step(params, opt, ex, [[0, 0]])  # no tokens: phi = 1, EMA kept
    assert ex.last_multipliers_LE[0].tolist() == [1.0, 1.0]
    assert ex.utilization_ema_LE[0].tolist() == [0.5, 0.5]


def test_floor_keeps_unused_experts_moving():
    params, opt, ex = _sgd_setup({"strategy": "zerosum", "floor": 0.1})
    _step(params, opt, ex, [[5, 0]])
    assert params[0].tolist() == pytest.approx([2.0] * 3 + [0.1] * 3, rel=1e-15, abs=1e-15)


def test_state_dict_round_trip_continues_identically():
    cfg = {"strategy": "random", "warmup_steps": 3, "utilization_ema": 0.3}
    p1, o1, ex1 = _sgd_setup(cfg, E=4)
    for c in ([[3, 1, 0, 2]], [[1, 4, 1, 1]]):
        _step(p1, o1, ex1, c)
    state = ex1.state_dict()
    p2, o2, ex2 = _sgd_setup(cfg, E=4)
    ex2.load_state_dict(state)
    with torch.no_grad():
        p2[0].copy_(p1[0])
    for c in ([[2, 2, 5, 0]], [[0, 1, 1, 7]]):
        _step(p1, o1, ex1, c)
        _step(p2, o2, ex2, c)
        assert torch.equal(ex1.last_multipliers_LE, ex2.last_multipliers_LE)
        assert torch.equal(p1[0], p2[0])
    with pytest.raises(ValueError, match="same MoE architecture"):
        Excitation(cfg, 2, 4, reduce=False).load_state_dict(state)


def test_metrics():
    params, opt, ex = _sgd_setup({"strategy": "zerosum"}, L=2, E=2)
    _step(params, opt, ex, [[3, 1], [4, 0]])
    m = ex.metrics()
    assert m["excitation/layer_00/utilization_max"] == 1.5
    assert m["excitation/layer_01/dead_experts"] == 1.0
    assert m["excitation/dead_experts"] == 1.0
    assert m["excitation/overload_factor"] == 2.0
    assert m["excitation/layer_01/multiplier_min"] == 0.0
    assert m["excitation/layer_00/gini_simpson"] == 1 - (0.75**2 + 0.25**2)
    assert m["excitation/layer_01/entropy"] == 0.0


def test_bad_segments_are_rejected():
    ex = Excitation({}, 1, 2, reduce=False)
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="outside a tensor"):
        ex.set_segments([ExpertSegment(t, 2, 6, 0, 0)])
    with pytest.raises(ValueError, match="expert 5"):
        ex.set_segments([ExpertSegment(t, 0, 2, 0, 5)])


def test_step_called_applied_but_never_run_is_a_skipped_step():
    """A wrapper can report a step applied whose base optimizer never ran (a
    GradScaler skipping it on overflow): nothing is applied, the counts are
    dropped, and the next step counts afresh instead of failing."""
    params, opt, ex = _sgd_setup({"strategy": "zerosum"})
    ex.record(0, torch.tensor([3, 1]))
    ex.reduce_counts_async()
    ex.finish_step(True)  # opt.step() was never called
    assert ex.step == 0
    _step(params, opt, ex, [[1, 1]])
    assert ex.last_counts_LE.tolist() == [[1, 1]] and ex.step == 1
    assert params[0].tolist() == [1.0] * 6


def test_count_reduction_waits_for_counted_recomputes():
    """With reentrant checkpointing a layer's counts arrive in backward: an early
    reduce_counts_async() (e.g. after the last forward) defers to the step."""
    params, opt, ex = _sgd_setup({"strategy": "zerosum"}, L=2)
    with torch.no_grad():  # layer 0's original forward under reentrant checkpointing
        assert not ex.count_this_forward(0, training=True)
    assert ex.count_this_forward(1, training=True)
    ex.record(1, torch.tensor([1, 1]))
    assert not ex.counts_final()
    ex.reduce_counts_async()  # deferred: layer 0 still owes its recompute
    ex.record(0, torch.tensor([3, 1]))  # ... which would otherwise be refused here
    for p in params:
        p.grad = -torch.ones_like(p)
    opt.step()
    assert ex.last_counts_LE.tolist() == [[3, 1], [1, 1]]
    assert not ex.count_this_forward(0, training=False)  # evaluation never counts


def test_count_buffer_device_follows_the_collective_backend(monkeypatch):
    import torch.distributed as dist

    from excitation_dist.core import collective_device

    assert collective_device(None) == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, device in [("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")]:
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device(None) == torch.device(device), backend


def test_count_buffer_without_reduction_moves_to_the_first_counts():
    ex = Excitation({}, 1, 2, reduce=False)
    ex.record(0, torch.tensor([1, 2], device="meta"))
    assert ex.device.type == "meta" and ex._counts_LE.device.type == "meta"
    pinned = Excitation({}, 1, 2, reduce=False, device="cpu")
    pinned.record(0, torch.tensor([1, 2]))
    assert pinned.device == torch.device("cpu")

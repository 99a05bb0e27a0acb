"""DeepSpeed's FusedAdam (the class itself, its CUDA kernel transcribed in torch:
tests/fused_adam_kernel.py) folds: the excited tensors are stepped at lr * phi by
Excitation in the optimizer's own formula and state, never by its kernel, with no
snapshot; the result equals the same optimizer with one parameter group per expert
at lr * phi, to float32 rounding."""

import copy
import logging

import pytest
import torch

from excitation_dist import Excitation, ExpertSegment, multipliers
from excitation_dist.config import ConfigError
from tests.fused_adam_kernel import install_deepspeed_fused_adam
from tests.test_core_equivalence import check_flat_shard_with_dense_gaps

L, E, D = 2, 4, 5
STEPS = 6
LR = 0.05
TOL = dict(rtol=2e-5, atol=2e-6)  # float32: the kernel's registers against torch ops rounding each intermediate


@pytest.fixture
def fused_adam(monkeypatch):
    recorder = install_deepspeed_fused_adam(monkeypatch)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam, recorder


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(L, E, D, generator=g)
    dense = torch.randn(D, generator=g)
    xs = torch.randn(STEPS, L, E, D, generator=g)
    counts = torch.randint(0, 50, (STEPS, L, E), generator=g)
    counts[1, 0, 2] = 0  # multiplier 0
    counts[3, 1] = 0  # a layer without tokens: multipliers 1
    return init, dense, xs, counts


def _loss(w, x, dense):
    return (torch.sin(w * x) * (1.0 + dense)).sum() + 0.1 * (w**2).sum()


OPTIONS = {
    "adamw": dict(weight_decay=0.1),
    "adam_l2": dict(weight_decay=0.05, adam_w_mode=False),
    "no_bias_correction": dict(weight_decay=0.1, bias_correction=False, betas=(0.8, 0.95)),
}


def _reference(FusedAdam, options, strategy):
    """One parameter group per expert, its lr set to phi * lr before each step: no Excitation code."""
    init, dense0, xs, counts = _problem()
    experts = [[torch.nn.Parameter(init[l, e].clone()) for e in range(E)] for l in range(L)]
    dense = torch.nn.Parameter(dense0.clone())
    opt = FusedAdam([{"params": [experts[l][e]]} for l in range(L) for e in range(E)] + [{"params": [dense]}],
                    lr=LR, **options)
    history = []
    for step in range(STEPS):
        phi = multipliers(counts[step], strategy)
        for i, group in enumerate(opt.param_groups[:-1]):
            group["lr"] = LR * phi[i // E, i % E].item()
        opt.zero_grad()
        sum(_loss(experts[l][e], xs[step, l, e], dense) for l in range(L) for e in range(E)).backward()
        opt.step()
        history.append((torch.stack([torch.stack(row) for row in experts]).detach().clone(), dense.detach().clone()))
    return history


def _excited(FusedAdam, options, strategy, update="auto", gamma=1.0):
    init, dense0, xs, counts = _problem()
    stacked = [torch.nn.Parameter(init[l].clone()) for l in range(L)]
    dense = torch.nn.Parameter(dense0.clone())
    opt = FusedAdam(stacked + [dense], lr=LR, **options)
    ex = Excitation({"strategy": strategy, "gamma": gamma, "update": update}, L, E, reduce=False)
    ex.set_segments(ExpertSegment(stacked[l], e * D, (e + 1) * D, l, e) for l in range(L) for e in range(E))
    ex.hook_optimizer(opt)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        sum(_loss(stacked[l][e], xs[step, l, e], dense) for l in range(L) for e in range(E)).backward()
        for l in range(L):
            ex.record(l, counts[step, l])
        opt.step()
        history.append((torch.stack(stacked).detach().clone(), dense.detach().clone()))
    return history, ex, opt, stacked, dense


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("strategy", ["zerosum", "expdiff"])
def test_deepspeed_fused_adam_folds_to_per_expert_learning_rates(fused_adam, option, strategy):
    FusedAdam, recorder = fused_adam
    reference = _reference(FusedAdam, OPTIONS[option], strategy)
    recorder.stepped.clear()
    excited, ex, opt, stacked, dense = _excited(FusedAdam, OPTIONS[option], strategy)
    assert ex.update_path == "folded"
    assert ex._update.peak_snapshot_bytes == 0  # no copy of the expert rows
    assert {p.data_ptr() for p in stacked}.isdisjoint(recorder.stepped)  # the kernel never stepped an excited tensor
    assert dense.data_ptr() in recorder.stepped  # dense tensors keep the optimizer's own kernel
    for step, ((ref_w, ref_d), (exc_w, exc_d)) in enumerate(zip(reference, excited)):
        torch.testing.assert_close(exc_w, ref_w, **TOL, msg=lambda m: f"{option} {strategy} step {step}: {m}")
        torch.testing.assert_close(exc_d, ref_d, **TOL)
    if strategy == "zerosum":  # multiplier 0 (layer 0, expert 2 at step 1): no change at all, weight decay included
        assert torch.equal(excited[0][0][0, 2], excited[1][0][0, 2])


def _train(opt, weights, dense, steps, ex=None, counts=None):
    _, _, xs, _ = _problem()
    for step in steps:
        opt.zero_grad()
        sum(_loss(weights[l][e], xs[step, l, e], dense) for l in range(L) for e in range(E)).backward()
        if ex is not None:
            for l in range(L):
                ex.record(l, counts[step, l])
        opt.step()


def _model():
    init, dense0, _, counts = _problem()
    return [torch.nn.Parameter(init[l].clone()) for l in range(L)], torch.nn.Parameter(dense0.clone()), counts


def _hooked(FusedAdam, weights, dense, gamma=0.0):
    opt = FusedAdam(weights + [dense], lr=LR, **OPTIONS["adamw"])
    ex = Excitation({"strategy": "zerosum", "gamma": gamma}, L, E, reduce=False)
    ex.set_segments(ExpertSegment(weights[l], e * D, (e + 1) * D, l, e) for l in range(L) for e in range(E))
    ex.hook_optimizer(opt)
    assert ex.update_path == "folded"
    return opt, ex


@pytest.mark.parametrize("direction", ["excited_to_plain", "plain_to_excited"])
def test_checkpoints_cross_between_the_optimizer_alone_and_the_folded_path(fused_adam, direction):
    """The optimizer's own state format: a state_dict saved by either run (with every
    multiplier 1) resumes in the other as the optimizer alone would continue, step
    counters included (DeepSpeed's bias correction reads the group's last counter)."""
    FusedAdam, _ = fused_adam
    first, second = range(3), range(3, STEPS)
    alone_w, alone_d, counts = _model()
    alone = FusedAdam(alone_w + [alone_d], lr=LR, **OPTIONS["adamw"])
    _train(alone, alone_w, alone_d, first)
    saved_alone = copy.deepcopy(alone.state_dict())  # a checkpoint: not the live moments
    _train(alone, alone_w, alone_d, second)

    w, d, _ = _model()
    if direction == "excited_to_plain":
        opt, ex = _hooked(FusedAdam, w, d)
        _train(opt, w, d, first, ex, counts)
        resumed = FusedAdam(w + [d], lr=LR, **OPTIONS["adamw"])
        resumed.load_state_dict(opt.state_dict())
        _train(resumed, w, d, second)
    else:
        plain = FusedAdam(w + [d], lr=LR, **OPTIONS["adamw"])
        _train(plain, w, d, first)
        opt, ex = _hooked(FusedAdam, w, d)
        opt.load_state_dict(saved_alone)
        _train(opt, w, d, second, ex, counts)
    for mine, theirs in zip(w + [d], alone_w + [alone_d]):
        torch.testing.assert_close(mine.detach(), theirs.detach(), **TOL)


def test_flat_partition_with_dense_gaps(fused_adam):
    """A ZeRO-style fp32 partition that starts and ends with dense elements and cuts
    the first and last expert, against one parameter group per piece."""
    FusedAdam, _ = fused_adam
    check_flat_shard_with_dense_gaps(lambda groups: FusedAdam(groups, lr=LR, weight_decay=0.1), dtype=torch.float32,
                                     tol=TOL, label="DeepSpeed FusedAdam")


def test_sixteen_bit_parameters_take_the_blend_path_and_folded_is_refused(fused_adam, caplog):
    FusedAdam, _ = fused_adam
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    ex = Excitation({}, 1, 2, reduce=False)
    ex.set_segments([ExpertSegment(p, 0, 2, 0, 0), ExpertSegment(p, 2, 4, 0, 1)])
    with caplog.at_level(logging.INFO, logger="excitation_dist.update"):
        ex.hook_optimizer(FusedAdam([p], lr=0.1))
    assert ex.update_path == "blend"
    assert any("DeepSpeed FusedAdam stepping torch.bfloat16" in r.getMessage() and "transient copy" in r.getMessage()
               for r in caplog.records)
    forced = Excitation({"update": "folded"}, 1, 2, reduce=False)
    forced.set_segments([ExpertSegment(p, 0, 2, 0, 0), ExpertSegment(p, 2, 4, 0, 1)])
    with pytest.raises(ConfigError, match=r"excitation\.update.*DeepSpeed FusedAdam"):
        forced.hook_optimizer(FusedAdam([p], lr=0.1))


def test_master_weights_inside_the_optimizer_are_refused_on_every_path(fused_adam):
    """Transformer Engine's master_weights=True (apex: use_master=True) overwrites the
    parameters from fp32 copies the optimizer keeps: neither path would reach them.
    (TE and apex do not install here; the attribute is what their classes set.)"""
    FusedAdam, _ = fused_adam
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FusedAdam([p], lr=0.1)
    opt.master_weights = True
    ex = Excitation({"update": "blend"}, 1, 2, reduce=False)
    ex.set_segments([ExpertSegment(p, 0, 2, 0, 0), ExpertSegment(p, 2, 4, 0, 1)])
    with pytest.raises(ConfigError, match="master_weights=True"):
        ex.hook_optimizer(opt)


def test_added_operations_and_host_syncs_do_not_grow_with_layers_times_experts(fused_adam):
    """benchmarks/step_ops.py's count with DeepSpeed's FusedAdam as the base (its kernel, one
    launch per call on a GPU, left out of the count): Excitation's own operations per step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_ops

    from excitation_dist.testing.syncs import count_host_syncs

    FusedAdam, _ = fused_adam
    make = lambda ps: FusedAdam(ps, lr=1e-3, weight_decay=0.1)  # noqa: E731
    for layout in ("per-expert", "flat"):
        added = {}
        for size in ((2, 4), (8, 16)):
            ops0, _, _ = step_ops.count(layout, *size, "foreach", None, make_optimizer=make)
            ops, launches, path = step_ops.count(layout, *size, "foreach", "auto", make_optimizer=make)
            assert path == "folded"
            added[size] = ops - ops0
        assert added[(8, 16)] <= added[(2, 4)] and added[(8, 16)] <= 64, (layout, added)
    prepare, opt, _ = step_ops._setup("per-expert", 4, 8, "foreach", "auto", make_optimizer=make)
    prepare()
    opt.step()
    prepare()
    with count_host_syncs() as counted:
        opt.step()
    assert sum(counted.values()) == 0, counted


def test_gpu_checks_exactness_section_runs_here(fused_adam):
    """make gpu-check's exactness rows (the first GPU run of TE / apex FusedAdam against the
    folded update) on CPU, with the optimizers this machine has: the code a GPU runs first works."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    FusedAdam, _ = fused_adam
    makers = {"torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
              "DeepSpeed FusedAdam (kernel transcribed)": lambda ps: FusedAdam(ps, lr=1e-2, weight_decay=0.1)}
    rows = gpu_check.exactness_rows(makers, "cpu")
    assert len(rows) == 4
    for r in rows:
        assert r["path"] == "folded" and r["rel_error"] <= gpu_check.EXACT_TOLERANCE, r
    broken = gpu_check.exactness_rows({"wrong lr": lambda ps: _WrongLr(ps)}, "cpu")
    assert all(r["rel_error"] > gpu_check.EXACT_TOLERANCE for r in broken), broken  # the check can fail
    assert "| NO |" in gpu_check.exactness_table(broken)


class _WrongLr(torch.optim.AdamW):
    """An AdamW that ignores per-group learning rates: its reference is wrong, and the check must say so."""

    def __init__(self, params):
        super().__init__(params, lr=1e-2, weight_decay=0.1, foreach=True)

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = 1e-2
        return super().step(closure)

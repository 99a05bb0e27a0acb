"""Blending the update by phi equals running each expert at learning rate phi * lr.

Reference: every (layer, expert) is its own parameter in its own param group
whose lr is set to phi * lr before each step; no Excitation code runs there.
Excited: the experts of a layer are stacked in one tensor, one optimizer at the
base lr, the core controller blends. Both compute the same per-expert loss.
"""

import pytest
import torch

from excitation_dist import Excitation, ExpertSegment, multipliers

L, E, D = 2, 4, 5
STEPS = 6
LR = 0.05

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=LR),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=LR),
    "adamw": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.1),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.1, fused=True),
    "adam_l2_foreach": lambda params: torch.optim.Adam(params, lr=LR, weight_decay=0.05, foreach=True),
    "sgd_nesterov_foreach": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, foreach=True),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=LR, weight_decay=0.05),
    "sgd_dampened": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.8, dampening=0.3, weight_decay=0.02),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=LR, momentum=0.5, centered=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=LR),
}


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(L, E, D, generator=g, dtype=torch.float64)
    dense = torch.randn(D, generator=g, dtype=torch.float64)
    xs = torch.randn(STEPS, L, E, D, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 50, (STEPS, L, E), generator=g)
    counts[1, 0, 2] = 0  # an expert with multiplier 0
    counts[3, 1] = 0  # a layer with no tokens (phi = 1)
    return init, dense, xs, counts


def _expert_loss(w, x, dense):
    """Nonlinear so that Adam's normalization matters; depends on one expert only."""
    return (torch.sin(w * x) * (1.0 + dense)).sum() + 0.1 * (w**2).sum()


def _run_reference(make_opt, strategy, gamma, seed=0):
    init, dense0, xs, counts = _problem(seed)
    experts = [[torch.nn.Parameter(init[l, e].clone()) for e in range(E)] for l in range(L)]
    dense = torch.nn.Parameter(dense0.clone())
    groups = [{"params": [experts[l][e]]} for l in range(L) for e in range(E)] + [{"params": [dense]}]
    opt = make_opt(groups)
    history = []
    for step in range(STEPS):
        phi = multipliers(counts[step], strategy, gamma)
        for i, group in enumerate(opt.param_groups[:-1]):
            group["lr"] = LR * phi[i // E, i % E].item()
        opt.zero_grad()
        loss = sum(_expert_loss(experts[l][e], xs[step, l, e], dense) for l in range(L) for e in range(E))
        loss.backward()
        opt.step()
        history.append((torch.stack([torch.stack(row) for row in experts]).detach().clone(), dense.detach().clone()))
    return history


def _run_excited(make_opt, strategy, gamma, seed=0, scale_gradients_instead=False, update="auto"):
    init, dense0, xs, counts = _problem(seed)
    stacked = [torch.nn.Parameter(init[l].clone()) for l in range(L)]  # [E, D] per layer
    dense = torch.nn.Parameter(dense0.clone())
    opt = make_opt([{"params": stacked + [dense]}])
    excitation = Excitation({"strategy": strategy, "gamma": gamma, "update": update}, L, E, reduce=False)
    excitation.set_segments(
        ExpertSegment(stacked[l], e * D, (e + 1) * D, l, e) for l in range(L) for e in range(E)
    )
    if not scale_gradients_instead:
        excitation.hook_optimizer(opt)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        for l in range(L):
            excitation.record(l, counts[step, l])
        loss = sum(_expert_loss(stacked[l][e], xs[step, l, e], dense) for l in range(L) for e in range(E))
        loss.backward()
        if scale_gradients_instead:
            phi = multipliers(counts[step], strategy, gamma)
            for l in range(L):
                stacked[l].grad.mul_(phi[l].unsqueeze(-1))
        opt.step()
        history.append((torch.stack(stacked).detach().clone(), dense.detach().clone()))
    return history, excitation


FOLDED = {"sgd", "sgd_momentum", "adam", "adamw", "adam_l2", "sgd_dampened",  # torch SGD / Adam / AdamW,
          "adamw_fused", "adam_l2_foreach", "sgd_nesterov_foreach"}  # single-tensor, foreach or fused


@pytest.mark.parametrize("update", ["auto", "blend"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("strategy, gamma", [("zerosum", 1.0), ("positivesum", 2.0), ("expdiff", 0.7)])
def test_excited_update_equals_per_expert_learning_rate(name, strategy, gamma, update):
    reference = _run_reference(OPTIMIZERS[name], strategy, gamma)
    excited, excitation = _run_excited(OPTIMIZERS[name], strategy, gamma, update=update)
    assert excitation.update_path == ("folded" if update == "auto" and name in FOLDED else "blend")
    for step, ((ref_w, ref_d), (exc_w, exc_d)) in enumerate(zip(reference, excited)):
        torch.testing.assert_close(exc_w, ref_w, rtol=1e-12, atol=1e-12, msg=f"{name} step {step}")
        torch.testing.assert_close(exc_d, ref_d, rtol=1e-12, atol=1e-12)  # dense parameters: plain lr
    assert excitation.step == STEPS


@pytest.mark.parametrize("name, update", [("adamw", "auto"), ("adamw", "blend"), ("adam_l2", "auto"), ("sgd_momentum", "auto")])
def test_multiplier_zero_leaves_expert_exactly_unchanged(name, update):
    _, _, _, counts = _problem()
    assert counts[1, 0, 2] == 0
    excited, _ = _run_excited(OPTIMIZERS[name], "zerosum", 1.0, update=update)
    before, after = excited[0][0][0, 2], excited[1][0][0, 2]
    assert torch.equal(before, after)  # bit for bit, weight decay included
    assert not torch.equal(excited[0][0][0, 1], excited[1][0][0, 1])


def test_scaling_gradients_is_not_excitation_for_adam():
    reference = _run_reference(OPTIMIZERS["adam"], "zerosum", 1.0)
    grad_scaled, _ = _run_excited(OPTIMIZERS["adam"], "zerosum", 1.0, scale_gradients_instead=True)
    blended, _ = _run_excited(OPTIMIZERS["adam"], "zerosum", 1.0)
    gap_grad = max((g[0] - r[0]).abs().max().item() for g, r in zip(grad_scaled, reference))
    gap_blend = max((b[0] - r[0]).abs().max().item() for b, r in zip(blended, reference))
    assert gap_blend < 1e-12
    # Adam is (almost) invariant to gradient scale: scaling gradients misses the per-expert lr by far
    assert gap_grad > 1e-2, gap_grad


def check_flat_shard_with_dense_gaps(make_opt, *, dtype=torch.float64, tol=None, label=""):
    """A flat tensor (like a ZeRO partition or a DistributedOptimizer shard) that
    starts and ends with dense elements and cuts the first and last expert: the
    folded update equals ``make_opt`` with each piece in its own param group at
    lr * phi (tests/test_fused_adams.py uses it too)."""
    tol = tol or {"rtol": 1e-12, "atol": 1e-12}
    g = torch.Generator().manual_seed(5)
    head, tail, cut = 3, 2, 2  # dense head, dense tail, elements of experts 0 and E-1 cut off by the shard
    sizes = [head, D - cut] + [D] * (E - 2) + [D - cut, tail]
    owner = [None] + list(range(E)) + [None]
    init = torch.randn(sum(sizes), generator=g, dtype=dtype)
    xs = torch.randn(STEPS, sum(sizes), generator=g, dtype=dtype)
    counts = torch.randint(0, 50, (STEPS, 1, E), generator=g)
    counts[2, 0, 1] = 0

    pieces = [torch.nn.Parameter(t.clone()) for t in init.split(sizes)]
    ref_opt = make_opt([{"params": [p]} for p in pieces])
    flat = torch.nn.Parameter(init.clone())
    opt = make_opt([flat])
    ex = Excitation({"strategy": "zerosum"}, 1, E, reduce=False)
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    ex.set_segments(ExpertSegment(flat, offsets[i], offsets[i + 1], 0, e) for i, e in enumerate(owner) if e is not None)
    ex.hook_optimizer(opt)
    assert ex.update_path == "folded"
    base_lr = ref_opt.param_groups[0]["lr"]
    for step in range(STEPS):
        phi = multipliers(counts[step], "zerosum")
        for group, e in zip(ref_opt.param_groups, owner):
            group["lr"] = base_lr * (1.0 if e is None else phi[0, e].item())
        for params, o in ((pieces, ref_opt), ([flat], opt)):
            o.zero_grad()
            x = torch.cat([p.reshape(-1) for p in params])
            (torch.sin(x * xs[step]).sum() + 0.1 * (x ** 2).sum()).backward()
        ex.record(0, counts[step, 0])
        ref_opt.step()
        opt.step()
        torch.testing.assert_close(flat.detach(), torch.cat([p.detach() for p in pieces]), **tol,
                                   msg=lambda m: f"{label} step {step}: {m}")


@pytest.mark.parametrize("name", sorted(FOLDED))
def test_folded_update_on_a_flat_shard_with_dense_gaps(name):
    check_flat_shard_with_dense_gaps(OPTIMIZERS[name], label=name)


def test_forcing_the_folded_path_on_an_unfoldable_optimizer_fails_naming_the_key():
    from excitation_dist.config import ConfigError

    p = torch.nn.Parameter(torch.zeros(4))
    ex = Excitation({"update": "folded"}, 1, 2, reduce=False)
    ex.set_segments([ExpertSegment(p, 0, 2, 0, 0), ExpertSegment(p, 2, 4, 0, 1)])
    with pytest.raises(ConfigError, match=r"excitation\.update.*RMSprop"):
        ex.hook_optimizer(torch.optim.RMSprop([p], lr=0.1))
    with pytest.raises(ConfigError, match="amsgrad=True"):
        ex.hook_optimizer(torch.optim.Adam([p], lr=0.1, amsgrad=True))


def test_unknown_optimizer_takes_the_blend_path_with_one_log_line(caplog):
    class Lion(torch.optim.Optimizer):  # not classifiable: any optimizer the project does not know
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad.sign(), alpha=-group["lr"])

    p = torch.nn.Parameter(torch.zeros(4))
    ex = Excitation({}, 1, 2, reduce=False)
    ex.set_segments([ExpertSegment(p, 0, 2, 0, 0), ExpertSegment(p, 2, 4, 0, 1)])
    with caplog.at_level("INFO", logger="excitation_dist.update"):
        ex.hook_optimizer(opt := Lion([p]))
    assert ex.update_path == "blend"
    assert [r.getMessage() for r in caplog.records if "blend path" in r.getMessage()] == [
        "Excitation: Lion takes the blend path (a transient copy of the owned expert rows per step): "
        "tests.test_core_equivalence.Lion is not one of torch.optim.SGD/Adam/AdamW or the DeepSpeed / apex / "
        "Transformer Engine FusedAdam"]
    ex.record(0, torch.tensor([3, 1]))
    p.grad = -torch.ones(4)
    opt.step()
    assert p.tolist() == pytest.approx([0.15, 0.15, 0.05, 0.05], rel=1e-6)

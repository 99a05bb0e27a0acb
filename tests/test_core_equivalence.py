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


def _run_excited(make_opt, strategy, gamma, seed=0, scale_gradients_instead=False):
    init, dense0, xs, counts = _problem(seed)
    stacked = [torch.nn.Parameter(init[l].clone()) for l in range(L)]  # [E, D] per layer
    dense = torch.nn.Parameter(dense0.clone())
    opt = make_opt([{"params": stacked + [dense]}])
    excitation = Excitation({"strategy": strategy, "gamma": gamma}, L, E, reduce=False)
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


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("strategy, gamma", [("zerosum", 1.0), ("positivesum", 2.0), ("expdiff", 0.7)])
def test_blended_update_equals_per_expert_learning_rate(name, strategy, gamma):
    reference = _run_reference(OPTIMIZERS[name], strategy, gamma)
    excited, excitation = _run_excited(OPTIMIZERS[name], strategy, gamma)
    for step, ((ref_w, ref_d), (exc_w, exc_d)) in enumerate(zip(reference, excited)):
        torch.testing.assert_close(exc_w, ref_w, rtol=1e-12, atol=1e-12, msg=f"{name} step {step}")
        torch.testing.assert_close(exc_d, ref_d, rtol=1e-12, atol=1e-12)  # dense parameters: plain lr
    assert excitation.step == STEPS


def test_multiplier_zero_leaves_expert_exactly_unchanged():
    _, _, _, counts = _problem()
    assert counts[1, 0, 2] == 0
    excited, _ = _run_excited(OPTIMIZERS["adamw"], "zerosum", 1.0)
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

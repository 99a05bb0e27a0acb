"""Where the excited update runs inside ``optimizer.step()``: closures, step
hooks registered after attach, micro-batches that mix checkpointing, complex
and sparse expert tensors.

Reference everywhere: the same model with a plain optimizer (no Excitation code),
then the definition ``new = old + phi * (stepped - old)`` on each expert's rows,
with phi from tokens counted independently from the router's logits.
"""

import pytest
import torch

from excitation_dist import Excitation, ExpertSegment, multipliers
from excitation_dist.config import ConfigError
from excitation_dist.models import GPTMoE, GPTMoEConfig
from excitation_dist.torch import attach
from tests.test_torch_counting import Checkpointed, RouterSpy

CFG = dict(vocab_size=32, seq_len=12, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2)
STEPS = 4

OPTIMIZERS = {  # (constructor, update path taken with update: auto)
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), "folded"),
    "sgd_momentum": (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01), "folded"),
    "rmsprop": (lambda params: torch.optim.RMSprop(params, lr=1e-2), "blend"),
}


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _model():
    torch.manual_seed(0)
    return GPTMoE(GPTMoEConfig(**CFG))


def _tokens(step, micro=0):
    return torch.randint(0, 32, (3, 13), generator=torch.Generator().manual_seed(100 * step + micro))


def _expert_params(model):
    return [(w, layer) for layer, block in enumerate(model.blocks)
            for w in (block.ffn.experts.w_in_EDF, block.ffn.experts.w_out_EFD)]


def _closure(model, opt, tokens):
    def closure():
        opt.zero_grad()
        loss = model(tokens)
        loss.backward()
        return loss
    return closure


def _definition_step(model, opt, spy, strategy, gamma, closure=None):
    """Plain step, then old + phi * (stepped - old) on every expert's rows, phi
    from the spy's counts of this step (the closure's forward included)."""
    olds = [w.detach().clone() for w, _ in _expert_params(model)]
    opt.step(closure)
    phi_LE = multipliers(spy.counts, strategy, gamma)
    with torch.no_grad():
        for (w, layer), old in zip(_expert_params(model), olds):
            w.copy_(old + phi_LE[layer].view(-1, 1, 1) * (w - old))


def _assert_same(a, b, exact):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("update", ["auto", "blend"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_that_holds_the_forward_is_counted_in_its_own_step(name, update):
    """Lightning-style loop: forward and backward happen inside step(closure).
    Fails before the fix: the folded path stepped the experts twice (Adam's step
    counter advanced by 2) and both paths scaled step s by step s-1's counts."""
    make, path = OPTIMIZERS[name]
    excited, plain = _model(), _model()
    opt_x, opt_p = make(excited.parameters()), make(plain.parameters())
    ex = attach(excited, opt_x, {"strategy": "zerosum", "gamma": 1.0, "update": update})
    assert ex.update_path == (path if update == "auto" else "blend")
    spy = RouterSpy(plain)
    for step in range(STEPS):
        spy.counts.zero_()
        loss_x = opt_x.step(_closure(excited, opt_x, _tokens(step)))
        _definition_step(plain, opt_p, spy, "zerosum", 1.0, _closure(plain, opt_p, _tokens(step)))
        assert torch.is_tensor(loss_x)  # the caller's closure's loss comes back from step()
        assert torch.equal(ex.last_counts_LE, spy.counts), step  # this step's tokens, not the previous step's
        assert (ex.last_multipliers_LE != 1).any()
    _assert_same(excited, plain, exact=False)
    if name == "adamw":
        assert all(float(opt_x.state[w]["step"]) == STEPS for w, _ in _expert_params(excited))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_excitation_with_every_multiplier_one_is_a_bitwise_noop(name):
    """gamma = 0 makes every phi 1: with or without a closure, the excited run
    must equal the plain optimizer to the last bit."""
    make, _ = OPTIMIZERS[name]
    for use_closure in (False, True):
        excited, plain = _model(), _model()
        opt_x, opt_p = make(excited.parameters()), make(plain.parameters())
        ex = attach(excited, opt_x, {"strategy": "zerosum", "gamma": 0.0})
        for step in range(STEPS):
            for model, opt in ((excited, opt_x), (plain, opt_p)):
                closure = _closure(model, opt, _tokens(step))
                if use_closure:
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
            assert torch.equal(ex.last_multipliers_LE, torch.ones_like(ex.last_multipliers_LE))
        _assert_same(excited, plain, exact=True)


@pytest.mark.parametrize("update", ["auto", "blend"])
def test_pre_hook_registered_after_attach_sees_and_changes_the_expert_gradients(update):
    """A gradient-clipping pre-hook registered after attach: its norm includes the
    experts and its clipping reaches them. Fails before the fix: the hook ran after
    the folded update and saw the experts with .grad None."""
    make, _ = OPTIMIZERS["adamw"]
    excited, plain = _model(), _model()
    opt_x, opt_p = make(excited.parameters()), make(plain.parameters())
    ex = attach(excited, opt_x, {"strategy": "zerosum", "update": update})
    seen = []

    def clip(model):
        def hook(opt, args, kwargs):
            seen.append(all(w.grad is not None for w, _ in _expert_params(model)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return hook

    opt_x.register_step_pre_hook(clip(excited))
    opt_p.register_step_pre_hook(clip(plain))
    spy = RouterSpy(plain)
    for step in range(STEPS):
        spy.counts.zero_()
        for model, opt in ((excited, opt_x), (plain, opt_p)):
            _closure(model, opt, _tokens(step))()
        opt_x.step()
        _definition_step(plain, opt_p, spy, "zerosum", 1.0)
        assert torch.equal(ex.last_counts_LE, spy.counts)
    assert all(seen)
    _assert_same(excited, plain, exact=False)


def test_post_hook_registered_before_attach_sees_the_gradients_back():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads_seen = []
    opt.register_step_post_hook(lambda o, a, k: grads_seen.append(
        all(w.grad is not None for w, _ in _expert_params(model))))
    attach(model, opt, {"strategy": "zerosum"})
    _closure(model, opt, _tokens(0))()
    opt.step()
    assert grads_seen == [True]


def test_optimizers_that_reevaluate_the_closure_are_refused():
    model = _model()
    with pytest.raises(ConfigError, match="LBFGS"):
        attach(model, torch.optim.LBFGS(model.parameters()), {"strategy": "zerosum"})

    class TwiceSGD(torch.optim.SGD):
        def step(self, closure=None):
            closure()
            return super().step(closure)

    model = _model()
    opt = TwiceSGD(model.parameters(), lr=0.1)
    attach(model, opt, {"strategy": "zerosum"})
    with pytest.raises(RuntimeError, match="more than once"):
        opt.step(_closure(model, opt, _tokens(0)))


def test_checkpointed_and_plain_micro_batches_of_one_layer_all_count():
    """Megatron's partial activation checkpointing and 1F1B warm-up: a reentrant-
    checkpointed micro-batch, then a plain one, then both backwards. Fails before
    the fix: the plain forward reset the layer's pending original (3 + 5 tokens
    counted as 5)."""
    model = _model()
    block0 = model.blocks[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt, {"strategy": "zerosum"})
    losses = []
    for micro, use_ckpt in enumerate((True, False, True)):
        model.blocks[0] = Checkpointed(block0, use_reentrant=True) if use_ckpt else block0
        losses.append(model(_tokens(0, micro)))
    for loss in reversed(losses):  # backwards after all forwards, as a pipeline warm-up does
        loss.backward()
    model.blocks[0] = block0
    opt.step()
    plain = _model()  # the same tokens without checkpointing, counted from the router's logits
    spy = RouterSpy(plain)
    for micro in range(3):
        plain(_tokens(0, micro))
    assert torch.equal(ex.last_counts_LE, spy.counts), (ex.last_counts_LE, spy.counts)


def _segments(p, num_experts=4):
    """Expert e of one layer owns the e-th contiguous quarter of ``p``."""
    chunk = p.numel() // num_experts
    return [ExpertSegment(p, e * chunk, (e + 1) * chunk, 0, e) for e in range(num_experts)]


def test_complex_expert_parameters_with_adam_take_the_blend_path_and_match_the_reference():
    """Fails before the fix: the folded path ran on complex tensors without
    view_as_real, and phi = 0 rows gave NaN."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(4, 3, dtype=torch.complex128, generator=g)
    counts = torch.tensor([[6, 2, 0, 4]])
    excited = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([excited], lr=0.1)
    ex = Excitation({"strategy": "zerosum"}, 1, 4, reduce=False)
    ex.set_segments(_segments(excited))
    ex.hook_optimizer(opt)
    assert ex.update_path == "blend"
    reference = [torch.nn.Parameter(init[e].clone()) for e in range(4)]
    phi = multipliers(counts, "zerosum", 1.0)[0]
    opt_ref = torch.optim.Adam([{"params": [r], "lr": 0.1 * float(phi[e])} for e, r in enumerate(reference)])
    for step in range(3):
        target = torch.randn(4, 3, dtype=torch.complex128, generator=g)
        ex.record(0, counts[0])
        (excited - target).abs().pow(2).sum().backward()
        sum((r - target[e]).abs().pow(2).sum() for e, r in enumerate(reference)).backward()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    assert torch.isfinite(torch.view_as_real(excited)).all()
    torch.testing.assert_close(excited.detach(), torch.stack([r.detach() for r in reference]))
    assert torch.equal(excited[2], init[2])  # phi = 0: unchanged


def test_sparse_expert_gradients_take_the_blend_path_per_step():
    """An embedding-style expert table with sparse gradients under SGD (update:
    auto picks folded). Fails before the fix: the first step raised."""
    table = torch.nn.Embedding(4 * 5, 3, sparse=True)  # expert e owns rows 5e..5e+4
    opt = torch.optim.SGD(table.parameters(), lr=0.5)
    ex = Excitation({"strategy": "zerosum"}, 1, 4, reduce=False)
    ex.set_segments(_segments(table.weight))
    ex.hook_optimizer(opt)
    assert ex.update_path == "folded"
    counts = torch.tensor([3, 1, 0, 4])
    phi = multipliers(counts[None], "zerosum", 1.0)[0]
    for step in range(2):
        ex.record(0, counts)
        old = table.weight.detach().clone()
        table(torch.tensor([0, 6, 11, 17, 19])).pow(2).sum().backward()
        grad = table.weight.grad.to_dense()
        opt.step()
        opt.zero_grad()
        expected = old - 0.5 * phi.repeat_interleave(5)[:, None] * grad
        torch.testing.assert_close(table.weight.detach(), expected)

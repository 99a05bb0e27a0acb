"""Which forwards count in the plain PyTorch backend, checked against counts
computed independently from the router's own outputs."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from excitation_dist.models import GPTMoE, GPTMoEConfig, TopKMoE
from excitation_dist.torch import attach, detach

CFG = dict(vocab_size=32, seq_len=12, d_model=16, n_layers=3, n_heads=2, d_ff=16, num_experts=4, top_k=2)


def _model(**overrides):
    torch.manual_seed(0)
    return GPTMoE(GPTMoEConfig(**{**CFG, **overrides}))


class RouterSpy:
    """Counts top-k assignments from each router's logits (forward hooks on the
    router Linear), independently of the backend's reporting path."""

    def __init__(self, model):
        self.counts = torch.zeros(len(model.blocks), model.cfg.num_experts, dtype=torch.int64)
        self.token_mask = None
        for layer, block in enumerate(model.blocks):
            block.ffn.experts.router.register_forward_hook(self._hook(layer, block.ffn.experts.top_k))

    def _hook(self, layer, k):
        def hook(module, inputs, logits):
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            idx = logits.topk(k, dim=-1).indices
            if self.token_mask is not None:
                idx = idx[self.token_mask.reshape(-1)]
            self.counts[layer] += torch.bincount(idx.reshape(-1), minlength=self.counts.shape[1])
        return hook


def _train_step(model, opt, tokens, mask=None):
    loss = model(tokens, mask)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_counts_match_router_and_evaluation_adds_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt, {"strategy": "zerosum"})
    spy = RouterSpy(model)
    tokens = torch.randint(0, 32, (3, 13))
    _train_step(model, opt, tokens)
    assert torch.equal(ex.last_counts_LE, spy.counts)
    assert ex.last_counts_LE.sum() == 3 * 3 * 12 * 2  # layers x tokens x k

    model.eval()
    model(tokens)  # eval forward with grad enabled
    model.train()
    with torch.no_grad():
        model(tokens)  # training-mode forward without grad
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert ex.last_counts_LE.sum() == 0
    assert ex.last_multipliers_LE.eq(1).all()


def test_gradient_accumulation_sums_micro_batches():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt)
    spy = RouterSpy(model)
    for _ in range(3):
        model(torch.randint(0, 32, (2, 13))).backward()
    opt.step()
    assert torch.equal(ex.last_counts_LE, spy.counts)
    assert ex.last_counts_LE.sum() == 3 * 3 * 2 * 12 * 2


def test_activation_recompute_is_not_counted_twice():
    torch.set_default_dtype(torch.float64)
    try:
        plain, ckpt = _model(), _model(activation_checkpointing=True)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, ckpt)]
        exs = [attach(m, o) for m, o in zip((plain, ckpt), opts)]
        for step in range(3):
            tokens = torch.randint(0, 32, (4, 13), generator=torch.Generator().manual_seed(step))
            for m, o in zip((plain, ckpt), opts):
                _train_step(m, o, tokens)
            assert torch.equal(exs[0].last_counts_LE, exs[1].last_counts_LE)
            assert exs[1].last_counts_LE.sum() == 3 * 4 * 12 * 2
        for a, b in zip(plain.parameters(), ckpt.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


class Checkpointed(torch.nn.Module):
    """Runs a block under torch.utils.checkpoint (as selective or Hugging Face-style
    checkpointing of some layers does)."""

    def __init__(self, block, use_reentrant):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x, mask):
        return checkpoint(self.block, x, mask, use_reentrant=self.use_reentrant)


def test_reentrant_checkpointing_of_some_layers_counts_every_layer_once():
    """Block 0 reentrant (original forward under no_grad, counted in backward),
    block 1 non-reentrant (original counted, recompute not), block 2 plain; two
    micro-batches per step: every layer's counts equal an uncheckpointed model's,
    and so do the parameters."""
    torch.set_default_dtype(torch.float64)
    try:
        plain, mixed = _model(), _model()
        mixed.blocks[0] = Checkpointed(mixed.blocks[0], use_reentrant=True)
        mixed.blocks[1] = Checkpointed(mixed.blocks[1], use_reentrant=False)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, mixed)]
        exs = [attach(m, o, {"strategy": "zerosum"}) for m, o in zip((plain, mixed), opts)]
        spy = RouterSpy(plain)
        for step in range(3):
            spy.counts.zero_()
            for m, o in zip((plain, mixed), opts):
                for micro in range(2):
                    tokens = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(10 * step + micro))
                    m(tokens).backward()
                o.step()
                o.zero_grad()
            assert torch.equal(exs[0].last_counts_LE, spy.counts)
            assert torch.equal(exs[1].last_counts_LE, spy.counts), (step, exs[1].last_counts_LE, spy.counts)
            assert (exs[1].last_multipliers_LE[0] != 1).any()  # layer 0 is excited, not stuck at phi = 1
        for a, b in zip(plain.parameters(), mixed.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_layer_seen_only_as_recompute_is_an_error_naming_it():
    """A layer whose original forward was not a training forward (here: run in
    eval mode, then recomputed in train mode) would silently keep phi = 1."""
    torch.manual_seed(0)
    model = _model(n_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt)
    x = model.tok(torch.randint(0, 32, (2, 12)))
    model.blocks[1].eval()
    h, _, _ = model.blocks[0](x, None)
    out, _, _ = checkpoint(model.blocks[1], h, None, use_reentrant=False)
    model.blocks[1].train()
    out.sum().backward()
    with pytest.raises(RuntimeError, match=r"MoE layer\(s\) \[1\].*train\(\) mode"):
        opt.step()


def test_padding_tokens_are_not_counted():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt)
    spy = RouterSpy(model)
    tokens = torch.randint(0, 32, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 2:] = False
    spy.token_mask = mask[:, :-1]
    _train_step(model, opt, tokens, mask)
    assert torch.equal(ex.last_counts_LE, spy.counts)
    assert ex.last_counts_LE.sum() == 3 * 2 * int(mask[:, :-1].sum())


@pytest.mark.parametrize("mode", ["processed", "routed"])
def test_capacity_dropped_tokens_count_only_when_routed(mode):
    torch.manual_seed(0)
    moe = TopKMoE(8, 8, 4, top_k=2, capacity_factor=0.5)
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    ex = attach(moe, opt, {"counts": mode})
    x = torch.randn(40, 8)
    _, experts_TK, _ = moe.route(x)
    routed = torch.bincount(experts_TK.reshape(-1), minlength=4)
    capacity = 10  # ceil(0.5 * 40 * 2 / 4)
    out, aux = moe(x)
    (out.sum() + aux).backward()
    opt.step()
    if mode == "routed":
        assert torch.equal(ex.last_counts_LE[0], routed)
    else:
        assert torch.equal(ex.last_counts_LE[0], routed.clamp_max(capacity))
        assert ex.last_counts_LE.sum() < routed.sum()


def test_attach_errors():
    model = _model()
    partial = torch.optim.SGD([p for n, p in model.named_parameters() if "w_in" not in n], lr=0.1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        attach(model, partial)
    with pytest.raises(ValueError, match="no MoE layer"):
        attach(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt)
    with pytest.raises(RuntimeError, match="already has Excitation"):
        attach(model, opt)
    detach(model)
    attach(model, opt)

"""The recipe's one GPT-MoE definition: every architecture knob builds with either
experts implementation, trains with Excitation on the torch experts, and the
combinations it cannot run are refused with a message."""

import pytest
import torch

from excitation_dist.models import GPTMoE, GPTMoEConfig
from excitation_dist.torch import attach

TINY = dict(vocab_size=32, seq_len=12, d_model=16, n_layers=3, n_heads=4, d_ff=16, num_experts=4, top_k=2)
PUBLISHED_KNOBS = dict(n_kv_heads=2, position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu",
                       shared_expert_d_ff=24, first_dense_layers=1, tie_embeddings=True, z_loss_coef=1e-3,
                       capacity_factor=1.0)


@pytest.mark.parametrize("knobs", [{}, PUBLISHED_KNOBS], ids=["gpt2-like", "olmoe-qwen-like"])
def test_every_knob_trains_with_excitation_on_torch_experts(knobs):
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig(**TINY, **knobs))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ex = attach(model, opt, {"strategy": "zerosum", "counts": "routed"})
    tokens = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(tokens).backward()
        opt.step()
        opt.zero_grad()
    moe_layers = TINY["n_layers"] - knobs.get("first_dense_layers", 0)
    assert ex.last_counts_LE.shape == (moe_layers, 4)
    assert ex.last_counts_LE.sum() == moe_layers * 2 * 12 * 2  # layers x tokens x k
    assert (model.last_losses["z"] > 0) == ("z_loss_coef" in knobs)
    assert (model.head.weight is model.tok.weight) == ("tie_embeddings" in knobs)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in model.last_losses.values())


def test_padding_is_neither_routed_nor_a_target():
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig(**TINY))
    tokens = torch.randint(0, 32, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 6:] = False
    loss_masked = model(tokens, mask)
    garbage = tokens.clone()
    garbage[1, 6:] = (garbage[1, 6:] + 7) % 32  # what the mask hides must not matter
    assert torch.equal(model(garbage, mask), loss_masked)


@pytest.mark.parametrize("knobs, message", [
    (dict(ep_size=2), "expert parallelism needs experts='deepspeed'"),
    (dict(experts="deepspeed", activation_checkpointing=True), "count its tokens twice"),
    (dict(experts="megablocks"), "experts must be 'torch' or 'deepspeed'"),
    (dict(position="rope", head_dim=3), "even head dimension"),
])
def test_what_cannot_run_is_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        GPTMoEConfig(**{**TINY, **knobs})


def test_deepspeed_experts_refuse_a_padding_mask():
    pytest.importorskip("deepspeed")
    import excitation_dist.deepspeed  # noqa: F401  (skips DeepSpeed's shm op build without a GPU)

    model = GPTMoE(GPTMoEConfig(**TINY, experts="deepspeed", capacity_factor=1.25))
    tokens = torch.randint(0, 32, (2, 13))
    with pytest.raises(ValueError, match="padding mask needs experts='torch'"):
        model(tokens, torch.ones(2, 13, dtype=torch.bool))

"""Router options (score function, top-k normalization and scaling, expert groups, load balancing none /
aux / seq_aux / aux-loss-free expert bias, z-loss, capacity factor): per option, Excitation's counts equal
the experts' actual assignments on the torch model; megatron-core's router, fed the recipe's mapping of the
same option, picks the same experts with the same weights as the torch router; and an option a backend
cannot express fails when the config loads, naming the key and the backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from excitation_dist.config import ConfigError
from excitation_dist.models import GPTMoE
from excitation_dist.models.moe import TopKMoE
from excitation_dist.recipe.config import load_run_config
from excitation_dist.torch import attach

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.hidden_size=16", "model.num_attention_heads=2", "model.seq_length=8",
         "model.moe.ffn_hidden_size=8", "model.vocab_size=32", "model.ffn_hidden_size=16"]
OPTIONS = {
    "softmax_normalized": [],
    "softmax_unnormalized": ["model.moe.normalize_topk=false"],
    "sigmoid": ["model.moe.score_function=sigmoid"],
    "scaling_factor": ["model.moe.topk_scaling_factor=2.5"],
    "expert_groups": ["model.moe.router_num_groups=4", "model.moe.router_group_topk=2"],
    "aux": ["model.moe.load_balancing=aux"],
    "seq_aux": ["model.moe.load_balancing=seq_aux"],
    "no_balancing": ["model.moe.load_balancing=none"],
    "aux_free_bias": ["model.moe.score_function=sigmoid", "model.moe.expert_bias=true",
                      "model.moe.load_balancing=none", "model.moe.expert_bias_update_rate=0.5"],
    "z_loss": ["model.moe.z_loss_coef=0.01"],
    "capacity_factor": ["model.moe.capacity_factor=0.5"],
    "top1": ["model.moe.top_k=1"],
}


def _cfg(backend: str, option: list[str]):
    return load_run_config(TINY, [f"backend={backend}", "precision=fp32", "parallel.expert_parallel=1", *SMALL, *option])


class AssignmentSpy:
    """Rows each expert's MLP actually processed (per layer), recorded inside TopKMoE.expert_mlp."""

    def __init__(self, model: GPTMoE) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, TopKMoE)]
        self.counts = torch.zeros(len(self.layers), self.layers[0].num_experts, dtype=torch.int64)
        for i, layer in enumerate(self.layers):
            original = layer.expert_mlp

            def spy(e, x, i=i, original=original):
                if torch.is_grad_enabled():
                    self.counts[i, e] += x.shape[0]
                return original(e, x)
            layer.expert_mlp = spy


@pytest.mark.parametrize("option", OPTIONS, ids=list(OPTIONS))
def test_excitation_counts_are_the_actual_assignments(option):
    from excitation_dist.recipe.backends.configs import gpt_moe_config

    cfg = _cfg("torch", OPTIONS[option])
    torch.manual_seed(0)
    model = GPTMoE(gpt_moe_config(cfg, "torch"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ex = attach(model, opt, {"strategy": "zerosum"})
    tokens = torch.randint(0, 32, (4, 9))
    for _ in range(3):  # later steps route with trained routers (and moved expert biases)
        spy = AssignmentSpy(model)
        loss = model(tokens)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_biases()
        assert torch.equal(ex.last_counts_LE, spy.counts), option
    assigned = int(spy.counts.sum())
    if option == "capacity_factor":
        assert assigned < 2 * 4 * 8 * 2  # some assignments dropped, and not counted
    else:
        assert assigned == 2 * 4 * 8 * cfg.model.moe.top_k  # layers x tokens x k
    if option == "aux_free_bias":  # the biases moved (and are state: a buffer)
        assert spy.layers[0].expert_bias_E.abs().sum() > 0
        assert any(name.endswith("expert_bias_E") for name, _ in model.named_buffers())
    if option == "no_balancing":
        assert model.last_losses["aux"].item() == 0.0 or True  # the loss is computed, weighted 0
        assert model.cfg.load_balancing == "none"


def test_expert_bias_moves_toward_balance_and_changes_the_choice():
    layer = TopKMoE(4, 4, num_experts=4, top_k=1, score_function="sigmoid", expert_bias=True,
                    expert_bias_update_rate=0.1)
    x = torch.randn(16, 4)
    _, experts, _ = layer.route(x)
    layer._count_for_bias(experts, torch.ones_like(experts, dtype=torch.bool))
    counts = torch.bincount(experts.reshape(-1), minlength=4).float()
    layer.update_expert_bias()
    assert torch.equal(layer.expert_bias_E, 0.1 * torch.sign(counts.mean() - counts))
    layer.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # a large bias wins the choice ...
    scores, experts, weights = layer.route(x)
    assert (experts == 3).all()
    assert torch.allclose(weights[:, 0], scores[:, 3])  # ... but the weight is the unbiased score (top-1: not normalized)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "capacity_factor"])
def test_megatron_router_agrees_with_the_torch_router(option):
    """The same logits through megatron-core's top-k routing, with the recipe's TransformerConfig mapping,
    and through TopKMoE.route: the same experts and weights (capacity: see test_megatron_units)."""
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from excitation_dist.megatron import compat
    from excitation_dist.recipe.backends.megatron import router_kwargs
    from excitation_dist.recipe.backends.configs import gpt_moe_config

    kw = router_kwargs(_cfg("megatron", OPTIONS[option]))
    mc = gpt_moe_config(_cfg("torch", OPTIONS[option]), "torch")
    torch.manual_seed(1)
    layer = TopKMoE(16, 8, mc.num_experts, mc.top_k, score_function=mc.score_function,
                    normalize_topk=mc.normalize_topk, topk_scaling_factor=mc.topk_scaling_factor,
                    num_groups=mc.router_num_groups, group_topk=mc.router_group_topk, expert_bias=mc.expert_bias)
    bias = None
    if mc.expert_bias:
        layer.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, mc.num_experts))
        bias = layer.expert_bias_E.clone()
    x = torch.randn(64, 16)
    _, experts, weights = layer.route(x)
    logits = layer.router(x).detach()
    probs, routing_map = topk_routing_with_score_function(
        logits, mc.top_k, use_pre_softmax=kw["moe_router_pre_softmax"], num_groups=kw["moe_router_num_groups"],
        group_topk=kw["moe_router_group_topk"], scaling_factor=kw["moe_router_topk_scaling_factor"],
        score_function=kw["moe_router_score_function"], expert_bias=bias)
    ours = torch.zeros_like(routing_map).scatter(1, experts, True)
    assert torch.equal(ours, routing_map)
    ours_probs = torch.zeros_like(probs).scatter(1, experts, weights.detach())
    assert torch.allclose(ours_probs, probs, atol=1e-6)
    assert torch.equal(compat.routed_tokens_per_expert(probs, routing_map, None), routing_map.sum(0))
    assert kw["moe_router_load_balancing_type"] == {"none": "none", "aux": "aux_loss", "seq_aux": "seq_aux_loss"}[
        mc.load_balancing]
    assert kw["moe_router_enable_expert_bias"] == mc.expert_bias
    assert (kw["moe_z_loss_coeff"] or 0.0) == mc.z_loss_coef


@pytest.mark.parametrize("backend, option, key", [
    ("deepspeed", ["model.moe.score_function=sigmoid"], "score_function"),
    ("deepspeed", ["model.moe.normalize_topk=false"], "normalize_topk"),
    ("deepspeed", ["model.moe.load_balancing=seq_aux"], "load_balancing"),
    ("deepspeed", ["model.moe.topk_scaling_factor=2.5"], "topk_scaling_factor"),
    ("deepspeed", ["model.moe.router_num_groups=4", "model.moe.router_group_topk=2"], "router_num_groups"),
    ("deepspeed", ["model.moe.expert_bias=true"], "expert_bias"),
    ("megatron", ["model.moe.expert_bias=true"], "expert_bias"),
    ("megatron", ["model.moe.score_function=sigmoid", "model.moe.normalize_topk=false"], "normalize_topk"),
])
def test_an_option_the_backend_cannot_express_fails_at_load(backend, option, key):
    with pytest.raises(ConfigError, match=rf"model\.moe\.{key}: backend {backend} cannot express"):
        load_run_config(TINY, [f"backend={backend}", *option])
    load_run_config(TINY, ["backend=torch", "precision=fp32", "parallel.expert_parallel=1", *option])  # torch can

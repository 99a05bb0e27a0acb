"""The GPT-style MoE language model the recipe trains on the torch and DeepSpeed backends.

Pre-norm blocks: causal self-attention (multi-head or grouped-query, learned or
rotary positions, optional QK-norm), then a feed-forward that is either dense
(the first ``first_dense_layers`` blocks) or routed experts with an optional
always-on shared expert beside them. Experts are GELU or SwiGLU MLPs. The knobs
cover the architectures of the published configs (OLMoE, Mixtral, Qwen3-MoE);
multi-head latent attention (DeepSeek-V2) is not built here.

Where the routed experts come from is ``experts``:

- ``"torch"``: :class:`~excitation_dist.models.moe.TopKMoE` (plain PyTorch,
  experts replicated; for :mod:`excitation_dist.torch`, DDP). Takes a padding
  mask and activation checkpointing.
- ``"deepspeed"``: ``deepspeed.moe.layer.MoE`` (DeepSpeed's ``TopKGate`` +
  ``Experts``, expert parallel over ``ep_size`` ranks; for
  :mod:`excitation_dist.deepspeed`). ``min_capacity`` applies here only.

The loss is next-token cross entropy + ``aux_loss_coef`` x the routers'
load-balancing loss + ``z_loss_coef`` x the router z-loss (mean squared
log-sum-exp of the router logits, ST-MoE), the latter recomputed from the
router's weight because DeepSpeed's gate does not return its logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from excitation_dist.models.config import GPTMoEConfig
from excitation_dist.models.moe import TopKMoE


def _norm(cfg: GPTMoEConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6 if cfg.norm_eps is None else cfg.norm_eps)
    return nn.LayerNorm(dim, eps=1e-5 if cfg.norm_eps is None else cfg.norm_eps)


class MLP(nn.Module):
    """GELU MLP, or SwiGLU (``w_in`` holds the gate and up projections)."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.swiglu = activation == "swiglu"
        self.w_in = nn.Linear(d_model, 2 * d_ff if self.swiglu else d_ff, bias=not self.swiglu)
        self.w_out = nn.Linear(d_ff, d_model, bias=not self.swiglu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(F.silu(gate) * up)
        return self.w_out(F.gelu(h))


def _rotate(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    return x_BHTd * cos_Td + torch.cat((-x2, x1), dim=-1) * sin_Td


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.h, self.g, self.d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.qkv = nn.Linear(cfg.d_model, (self.h + 2 * self.g) * self.d, bias=cfg.norm == "layernorm")
        self.proj = nn.Linear(self.h * self.d, cfg.d_model, bias=cfg.norm == "layernorm")
        self.q_norm = _norm(cfg, self.d) if cfg.qk_norm else nn.Identity()
        self.k_norm = _norm(cfg, self.d) if cfg.qk_norm else nn.Identity()
        self.rope = cfg.position == "rope"
        if self.rope:
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d)
            angles_Td = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
            self.register_buffer("cos_Td", angles_Td.cos(), persistent=False)
            self.register_buffer("sin_Td", angles_Td.sin(), persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split([self.h * self.d, self.g * self.d, self.g * self.d], dim=-1)
        q = self.q_norm(q.view(B, T, self.h, self.d)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.g, self.d)).transpose(1, 2)
        v = v.view(B, T, self.g, self.d).transpose(1, 2)
        if self.rope:
            cos, sin = self.cos_Td[:T].to(q.dtype), self.sin_Td[:T].to(q.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.g != self.h)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.h * self.d))


def _deepspeed_experts(cfg: GPTMoEConfig) -> nn.Module:
    from deepspeed.moe.layer import MoE

    capacity = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
    return MoE(cfg.d_model, MLP(cfg.d_model, cfg.d_ff, cfg.activation), num_experts=cfg.num_experts,
               ep_size=cfg.ep_size, k=cfg.top_k, capacity_factor=capacity, eval_capacity_factor=capacity,
               min_capacity=cfg.min_capacity, drop_tokens=cfg.capacity_factor is not None,
               # deterministic top-k (as Mixtral and OLMoE route) and capacity drops in token order (as
               # megatron-core drops): DeepSpeed's checkpoint does not hold the generator random gating draws from,
               # so with it on a resumed run would route differently from the uninterrupted one
               top2_2nd_expert_sampling=False, use_rts=False)


class MoEFeedForward(nn.Module):
    """Routed experts (``cfg.experts``) plus an optional shared expert."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.on_deepspeed = cfg.experts == "deepspeed"
        if self.on_deepspeed:
            self.experts = _deepspeed_experts(cfg)
        else:
            self.experts = TopKMoE(
                cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.activation,
                score_function=cfg.score_function, normalize_topk=cfg.normalize_topk,
                topk_scaling_factor=cfg.topk_scaling_factor, num_groups=cfg.router_num_groups,
                group_topk=cfg.router_group_topk, load_balancing=cfg.load_balancing, expert_bias=cfg.expert_bias,
                expert_bias_update_rate=cfg.expert_bias_update_rate)
        self.shared = MLP(cfg.d_model, cfg.shared_expert_d_ff, cfg.activation) if cfg.shared_expert_d_ff else None
        self.with_z_loss = cfg.z_loss_coef > 0

    @property
    def router_weight_ED(self) -> torch.Tensor:
        return self.experts.deepspeed_moe.gate.wg.weight if self.on_deepspeed else self.experts.router.weight

    def forward(
        self, h_BTD: torch.Tensor, mask_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, load-balancing loss, router z-loss)."""
        if self.on_deepspeed:
            if mask_BT is not None:
                raise ValueError("a padding mask needs experts='torch' (DeepSpeed's gate routes every token)")
            out, l_aux, _ = self.experts(h_BTD)
        else:
            out, l_aux = self.experts(h_BTD, mask_BT)
        if self.shared is not None:
            out = out + self.shared(h_BTD)
        z_loss = l_aux.new_zeros((), dtype=torch.float32)
        if self.with_z_loss:
            logits_NE = F.linear(h_BTD.reshape(-1, h_BTD.shape[-1]).float(), self.router_weight_ED.float())
            if mask_BT is not None:
                logits_NE = logits_NE[mask_BT.reshape(-1)]
            z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        return out, l_aux.float(), z_loss


class Block(nn.Module):
    def __init__(self, cfg: GPTMoEConfig, dense: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.d_model), _norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = MLP(cfg.d_model, cfg.dense_d_ff, cfg.activation) if dense else MoEFeedForward(cfg)

    def forward(
        self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (output, load-balancing loss, router z-loss); the losses are None in a dense block."""
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        h_BTD = self.norm2(x_BTD)
        if isinstance(self.ffn, MLP):
            return x_BTD + self.ffn(h_BTD), None, None
        out, l_aux, z_loss = self.ffn(h_BTD, mask_BT)
        return x_BTD + out, l_aux, z_loss


class GPTMoE(nn.Module):
    """``forward(tokens_BT1, mask_BT1=None)`` with ``[B, T + 1]`` token ids (and
    an optional bool padding mask, False = padding: neither routed nor a target)
    returns the training loss (scalar); its components, detached, are in
    :attr:`last_losses` (no host sync)."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, dense=i < cfg.first_dense_layers) for i in range(cfg.n_layers))
        self.ln_f = _norm(cfg, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for embedding in (self.tok, self.pos):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=0.02)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.last_losses: dict[str, torch.Tensor] = {}

    def logits(
        self, x_BT: torch.Tensor, mask_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, T, V] in fp32, summed load-balancing loss, summed router z-loss)."""
        h = self.tok(x_BT)
        if self.pos is not None:
            h = h + self.pos(torch.arange(x_BT.shape[1], device=x_BT.device))
        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                h, l_aux, z_loss = checkpoint(block, h, mask_BT, use_reentrant=False)
            else:
                h, l_aux, z_loss = block(h, mask_BT)
            if l_aux is not None:
                aux, z = aux + l_aux, z + z_loss
        return self.head(self.ln_f(h)).float(), aux, z

    def lm_losses(
        self, tokens_BT1: torch.Tensor, mask_BT1: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss with the router losses, next-token cross entropy over
        the unmasked targets)."""
        x_BT, y_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        mask_BT = None if mask_BT1 is None else mask_BT1[:, :-1]
        if mask_BT1 is not None:
            y_BT = y_BT.masked_fill(~mask_BT1[:, 1:], -100)
        logits, aux, z = self.logits(x_BT, mask_BT)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BT.reshape(-1), ignore_index=-100)
        aux_coef = 0.0 if self.cfg.load_balancing == "none" else self.cfg.aux_loss_coef
        loss = ce + aux_coef * aux + self.cfg.z_loss_coef * z
        self.last_losses = {"ce": ce.detach(), "aux": aux.detach(), "z": z.detach()}
        return loss, ce

    def forward(self, tokens_BT1: torch.Tensor, mask_BT1: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_losses(tokens_BT1, mask_BT1)[0]

    def update_expert_biases(self) -> None:
        """After each optimizer step: move the auxiliary-loss-free expert biases (``expert_bias``); no-op otherwise."""
        for module in self.modules():
            if isinstance(module, TopKMoE):
                module.update_expert_bias()

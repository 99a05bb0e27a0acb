"""A GPT-style MoE language model on ``deepspeed.moe.layer.MoE``.

Pre-norm blocks: causal self-attention (multi-head or grouped-query, learned or
rotary positions, optional QK-norm), then a feed-forward that is either dense
(the first ``first_dense_layers`` blocks) or a routed MoE (DeepSpeed's
``TopKGate`` + ``Experts``, expert parallel over ``ep_size`` ranks) with an
optional always-on shared expert beside it. Experts are GELU or SwiGLU MLPs.
The knobs cover the architectures of the published configs (OLMoE, Mixtral,
Qwen3-MoE); multi-head latent attention (DeepSeek-V2) is not built here.

The loss is next-token cross entropy + ``aux_loss_coef`` x the gates'
load-balancing loss + ``z_loss_coef`` x the router z-loss (mean squared
log-sum-exp of the router logits, ST-MoE), the latter recomputed from the
gate's weight because DeepSpeed's gate does not return its logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTMoEConfig:
    vocab_size: int = 256  # bytes
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model / n_heads
    d_ff: int = 128  # hidden size of each routed expert
    dense_d_ff: int = 256  # hidden size of the dense FFN blocks (first_dense_layers)
    num_experts: int = 4
    top_k: int = 2
    ep_size: int = 1
    capacity_factor: float | None = 1.25  # None: no token dropping
    min_capacity: int = 4
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    activation: Literal["gelu", "swiglu"] = "gelu"
    shared_expert_d_ff: int | None = None  # an always-on shared expert of this width beside the routed ones
    first_dense_layers: int = 0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads} (or set head_dim)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts {self.num_experts} must be divisible by ep_size {self.ep_size}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {self.top_k}")
        if not 0 <= self.first_dense_layers < self.n_layers:
            raise ValueError(f"first_dense_layers must be in [0, n_layers={self.n_layers}), got {self.first_dense_layers}")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.dim_per_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


def _norm(cfg: GPTMoEConfig, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim)


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


class MoEFeedForward(nn.Module):
    """Routed experts (``deepspeed.moe``) plus an optional shared expert."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        capacity = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
        self.moe = MoE(cfg.d_model, MLP(cfg.d_model, cfg.d_ff, cfg.activation), num_experts=cfg.num_experts,
                       ep_size=cfg.ep_size, k=cfg.top_k, capacity_factor=capacity, eval_capacity_factor=capacity,
                       min_capacity=cfg.min_capacity, drop_tokens=cfg.capacity_factor is not None,
                       top2_2nd_expert_sampling=False)  # deterministic top-k, as Mixtral and OLMoE route
        self.shared = MLP(cfg.d_model, cfg.shared_expert_d_ff, cfg.activation) if cfg.shared_expert_d_ff else None
        self.with_z_loss = cfg.z_loss_coef > 0

    def forward(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, load-balancing loss, router z-loss)."""
        out, l_aux, _ = self.moe(h_BTD)
        if self.shared is not None:
            out = out + self.shared(h_BTD)
        z_loss = l_aux.new_zeros((), dtype=torch.float32)
        if self.with_z_loss:
            wg = self.moe.deepspeed_moe.gate.wg.weight
            logits_NE = F.linear(h_BTD.reshape(-1, h_BTD.shape[-1]).float(), wg.float())
            z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        return out, l_aux.float(), z_loss


class Block(nn.Module):
    def __init__(self, cfg: GPTMoEConfig, dense: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.d_model), _norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = MLP(cfg.d_model, cfg.dense_d_ff, cfg.activation) if dense else MoEFeedForward(cfg)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        h_BTD = self.norm2(x_BTD)
        if isinstance(self.ffn, MLP):
            return x_BTD + self.ffn(h_BTD), None, None
        out, l_aux, z_loss = self.ffn(h_BTD)
        return x_BTD + out, l_aux, z_loss


class GPTMoE(nn.Module):
    """``forward(tokens_BT1)`` with ``[B, T + 1]`` token ids returns the training
    loss (scalar); the last components are in :attr:`last_losses`."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, dense=i < cfg.first_dense_layers) for i in range(cfg.n_layers))
        self.ln_f = _norm(cfg, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.last_losses: dict[str, float] = {}

    def lm_losses(self, tokens_BT1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss with the router losses, next-token cross entropy)."""
        x_BT, y_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        h = self.tok(x_BT)
        if self.pos is not None:
            h = h + self.pos(torch.arange(x_BT.shape[1], device=x_BT.device))
        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, l_aux, z_loss = block(h)
            if l_aux is not None:
                aux, z = aux + l_aux, z + z_loss
        logits = self.head(self.ln_f(h)).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BT.reshape(-1))
        loss = ce + self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        self.last_losses = {"ce": float(ce.detach()), "aux": float(aux.detach()), "z": float(z.detach())}
        return loss, ce

    def forward(self, tokens_BT1: torch.Tensor) -> torch.Tensor:
        return self.lm_losses(tokens_BT1)[0]


def moe_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for a client optimizer under DeepSpeed: decay on matrices
    only, then split so expert parameters get their own (expert-data-parallel)
    groups, as ZeRO requires for MoE."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)

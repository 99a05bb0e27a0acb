"""A compact GPT-style MoE language model on ``deepspeed.moe.layer.MoE``.

Pre-norm blocks: causal self-attention, then a routed MoE FFN (DeepSpeed's
``TopKGate`` + ``Experts``, expert parallel over ``ep_size`` ranks). The loss
is next-token cross entropy + ``aux_loss_coef`` x the gates' load-balancing
loss + ``z_loss_coef`` x the router z-loss (mean squared log-sum-exp of the
router logits, ST-MoE), the latter recomputed from the gate's weight because
DeepSpeed's gate does not return its logits.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    d_ff: int = 128  # per expert
    num_experts: int = 4
    top_k: int = 2
    ep_size: int = 1
    capacity_factor: float = 1.25
    min_capacity: int = 4
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts {self.num_experts} must be divisible by ep_size {self.ep_size}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {self.top_k}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MoEBlock(nn.Module):
    def __init__(self, cfg: GPTMoEConfig) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        expert = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.moe = MoE(cfg.d_model, expert, num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor,
                       min_capacity=cfg.min_capacity)
        self.with_z_loss = cfg.z_loss_coef > 0

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, load-balancing loss, router z-loss)."""
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD))
        h_BTD = self.ln2(x_BTD)
        out, l_aux, _ = self.moe(h_BTD)
        z_loss = l_aux.new_zeros((), dtype=torch.float32)
        if self.with_z_loss:
            wg = self.moe.deepspeed_moe.gate.wg.weight
            logits_NE = F.linear(h_BTD.reshape(-1, h_BTD.shape[-1]).float(), wg.float())
            z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        return x_BTD + out, l_aux, z_loss


class GPTMoE(nn.Module):
    """``forward(tokens_BT1)`` with ``[B, T + 1]`` token ids returns the training
    loss (scalar); the last components are in :attr:`last_losses`."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.last_losses: dict[str, float] = {}

    def forward(self, tokens_BT1: torch.Tensor) -> torch.Tensor:
        x_BT, y_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        T = x_BT.shape[1]
        h = self.tok(x_BT) + self.pos(torch.arange(T, device=x_BT.device))
        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, l_aux, z_loss = block(h)
            aux, z = aux + l_aux.float(), z + z_loss
        logits = self.head(self.ln_f(h)).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BT.reshape(-1))
        loss = ce + self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        self.last_losses = {"ce": float(ce.detach()), "aux": float(aux.detach()), "z": float(z.detach())}
        return loss


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

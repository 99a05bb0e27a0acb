"""A tiny decoder-only MoE transformer for tests and the CPU demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from excitation_dist.models.moe import TopKMoE


@dataclass
class TinyMoEConfig:
    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    activation_checkpointing: bool = False


class Block(nn.Module):
    def __init__(self, cfg: TinyMoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm_attn = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm_moe = nn.LayerNorm(cfg.d_model)
        self.moe = TopKMoE(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.capacity_factor)

    def forward(self, x_BSD: torch.Tensor, mask_BS: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm_attn(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BSD = x_BSD + self.proj(attn.transpose(1, 2).reshape(B, S, D))
        moe_out, aux = self.moe(self.norm_moe(x_BSD), mask_BS)
        return x_BSD + moe_out, aux


class TinyMoETransformer(nn.Module):
    """Decoder-only LM: embeddings, ``n_layers`` blocks of causal attention +
    top-k MoE FFN, final norm, tied output head."""

    def __init__(self, cfg: TinyMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens_BS: torch.Tensor, mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [B, S, V], summed load-balancing loss)."""
        x = self.embed(tokens_BS) + self.pos[: tokens_BS.shape[1]]
        aux_total = x.new_zeros(())
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x, aux = checkpoint(block, x, mask_BS, use_reentrant=False)
            else:
                x, aux = block(x, mask_BS)
            aux_total = aux_total + aux
        return self.norm(x) @ self.embed.weight.T, aux_total

    def loss(self, tokens_BS: torch.Tensor, mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`lm_loss`."""
        return lm_loss(self, self.cfg.aux_loss_coef, tokens_BS, mask_BS)


def lm_loss(
    model: nn.Module, aux_loss_coef: float, tokens_BS: torch.Tensor, mask_BS: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on ``tokens[:, :-1] -> tokens[:, 1:]`` (padding
    targets ignored) plus ``aux_loss_coef`` times the load-balancing loss.

    ``model`` is a :class:`TinyMoETransformer` or a wrapper of it (DDP) that
    returns (logits, aux loss). Returns (total loss, language-model loss)."""
    inputs, targets = tokens_BS[:, :-1], tokens_BS[:, 1:]
    in_mask = None if mask_BS is None else mask_BS[:, :-1]
    logits, aux = model(inputs, in_mask)
    if mask_BS is not None:
        targets = targets.masked_fill(~mask_BS[:, 1:], -100)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return lm + aux_loss_coef * aux, lm

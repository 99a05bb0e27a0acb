"""A reference token-choice top-k MoE feed-forward layer (plain PyTorch).

Router: linear -> softmax -> top-k, top-k probabilities renormalized (Mixtral).
Optional expert capacity (Switch): each expert processes at most
``ceil(capacity_factor * T * K / E)`` assignments, in token order; the rest are
dropped (their contribution is zero). Experts are GELU or SwiGLU MLPs stacked
into ``w_in_EDF`` (``[E, D, 2F]`` for SwiGLU: gate and up projections) and
``w_out_EFD``, so expert e is chunk e of each. It reports its routing to
:mod:`excitation_dist.torch`, the backend that attaches Excitation to it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from excitation_dist.torch import ExpertSlice, report_expert_counts


class TopKMoE(nn.Module):
    """Token-choice top-k MoE FFN.

    Args:
        d_model: D, model width.
        d_ff: F, hidden width of each expert.
        num_experts: E routed experts.
        top_k: K experts per token.
        capacity_factor: None for no dropping; else the Switch capacity factor.
        activation: "gelu", or "swiglu" (silu(x W_gate) * x W_up).
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = None,
        activation: Literal["gelu", "swiglu"] = "gelu",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.swiglu = activation == "swiglu"
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_ff if self.swiglu else d_ff))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d_model, d_ff = self.w_out_EFD.shape[2], self.w_out_EFD.shape[1]
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.normal_(self.w_in_EDF, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w_out_EFD, std=1.0 / math.sqrt(d_ff))

    def excitation_expert_slices(self):
        for w in (self.w_in_EDF, self.w_out_EFD):
            chunk = w.numel() // self.num_experts
            for e in range(self.num_experts):
                yield ExpertSlice(w, e, e * chunk, (e + 1) * chunk)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (router probabilities [T, E], top-k experts [T, K],
        top-k weights [T, K])."""
        probs_TE = F.softmax(self.router(x_TD), dim=-1, dtype=torch.float32).to(x_TD.dtype)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return probs_TE, experts_TK, weights_TK

    def processed_mask(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """bool [T, K]: assignments within their expert's capacity."""
        if self.capacity_factor is None:
            return torch.ones_like(experts_TK, dtype=torch.bool)
        num_tokens = experts_TK.shape[0]
        capacity = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        one_hot = F.one_hot(experts_TK.reshape(-1), self.num_experts)  # token-major order
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
        return (position < capacity).reshape(experts_TK.shape)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D]; token_mask: optional bool [...] (False: padding, not counted).

        Returns (output [..., D], Switch load-balancing loss, a scalar)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        mask_T = None if token_mask is None else token_mask.reshape(-1)
        probs_TE, experts_TK, weights_TK = self.route(x_TD)
        keep_TK = self.processed_mask(experts_TK)
        report_expert_counts(self, experts_TK, token_mask=mask_T, processed_mask=keep_TK)

        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            token_idx, slot = torch.nonzero((experts_TK == e) & keep_TK, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            h = self.expert_mlp(e, x_TD[token_idx])
            out_TD.index_add_(0, token_idx, h * weights_TK[token_idx, slot, None])
        return out_TD.reshape(shape), self.load_balancing_loss(probs_TE, experts_TK, mask_T)

    def expert_mlp(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        h_NF = x_ND @ self.w_in_EDF[e]
        if self.swiglu:
            gate_NF, up_NF = h_NF.chunk(2, dim=-1)
            return (F.silu(gate_NF) * up_NF) @ self.w_out_EFD[e]
        return F.gelu(h_NF) @ self.w_out_EFD[e]

    def load_balancing_loss(
        self, probs_TE: torch.Tensor, experts_TK: torch.Tensor, mask_T: torch.Tensor | None
    ) -> torch.Tensor:
        """Switch Transformer loss E * sum_e f_e * P_e (1 when balanced)."""
        if mask_T is not None:
            probs_TE, experts_TK = probs_TE[mask_T], experts_TK[mask_T]
        if probs_TE.shape[0] == 0:
            return probs_TE.new_zeros(())
        f_E = F.one_hot(experts_TK, self.num_experts).sum((0, 1)).to(probs_TE.dtype) / experts_TK.numel()
        return self.num_experts * (f_E * probs_TE.mean(0)).sum()

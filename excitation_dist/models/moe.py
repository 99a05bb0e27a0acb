"""A reference token-choice top-k MoE feed-forward layer (plain PyTorch).

Router: linear -> softmax (or sigmoid) scores -> top-k (optionally among the best
expert groups, and chosen on scores plus a per-expert bias for auxiliary-loss-free
balancing), the k weights optionally renormalized and scaled. With the defaults:
softmax, top-k probabilities renormalized (Mixtral). Load balancing: the Switch
auxiliary loss over all tokens (aux), per sequence (seq_aux, DeepSeek), or none.
Optional expert capacity (Switch): each expert processes at most
``ceil(capacity_factor * T * K / E)`` assignments, in token order; the rest are
dropped (their contribution is zero). Experts are GELU or SwiGLU MLPs stacked
into ``w_in_EDF`` (``[E, D, 2F]`` for SwiGLU: gate and up projections) and
``w_out_EFD``, so expert e is chunk e of each. It reports its routing to
:mod:`excitation_dist.torch`, the backend that attaches Excitation to it. With
``expert_parallel_group`` set, the experts live on the ranks of that group and
tokens are exchanged all-to-all (:mod:`excitation_dist.models.expert_parallel`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from excitation_dist.counting import tokens_per_expert
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
        activation: Literal["gelu", "swiglu"] = "gelu", score_function: Literal["softmax", "sigmoid"] = "softmax",
        normalize_topk: bool = True, topk_scaling_factor: float | None = None, num_groups: int | None = None,
        group_topk: int | None = None, load_balancing: Literal["none", "aux", "seq_aux"] = "aux",
        expert_bias: bool = False, expert_bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function must be softmax or sigmoid, got {score_function!r}")
        if load_balancing not in ("none", "aux", "seq_aux"):
            raise ValueError(f"load_balancing must be none, aux or seq_aux, got {load_balancing!r}")
        if (num_groups is None) != (group_topk is None) or (
                num_groups is not None and (num_experts % num_groups or top_k % group_topk
                                            or top_k // group_topk > num_experts // num_groups)):
            raise ValueError(f"group-limited routing needs num_groups dividing num_experts={num_experts} and "
                             f"group_topk dividing top_k={top_k}; got {num_groups}, {group_topk}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.swiglu = activation == "swiglu"
        self.score_function, self.normalize_topk, self.topk_scaling_factor = score_function, normalize_topk, topk_scaling_factor
        self.num_groups, self.group_topk, self.load_balancing = num_groups, group_topk, load_balancing
        self.expert_bias_update_rate = expert_bias_update_rate
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_ff if self.swiglu else d_ff))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        # auxiliary-loss-free balancing: a bias for the top-k choice only, moved by update_expert_bias()
        self.register_buffer("expert_bias_E", torch.zeros(num_experts) if expert_bias else None)
        self._bias_counts_E: torch.Tensor | None = None  # assignments since the last update (not a buffer: DDP
        # would overwrite every rank's with rank 0's)
        self.expert_parallel_group = None  # a ProcessGroup: experts sharded over it, tokens exchanged all-to-all
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
        """Returns (router scores [T, E]: probabilities, or sigmoids; top-k experts [T, K];
        top-k weights [T, K])."""
        logits_TE = self.router(x_TD).float()
        scores_TE = F.softmax(logits_TE, dim=-1) if self.score_function == "softmax" else torch.sigmoid(logits_TE)
        select_TE = scores_TE if self.expert_bias_E is None else scores_TE + self.expert_bias_E.float()
        if self.num_groups is not None:  # keep the experts of each token's group_topk best groups
            grouped_TGe = select_TE.view(select_TE.shape[0], self.num_groups, -1)
            group_score_TG = grouped_TGe.topk(self.top_k // self.group_topk, dim=-1).values.sum(-1)
            best_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
                1, group_score_TG.topk(self.group_topk, dim=-1).indices, True)
            select_TE = grouped_TGe.masked_fill(~best_TG[..., None], float("-inf")).view_as(select_TE)
        experts_TK = select_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.normalize_topk and self.top_k > 1:  # top-1: the weight is the score (the router gets a gradient)
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        if self.topk_scaling_factor is not None:
            weights_TK = weights_TK * self.topk_scaling_factor
        return scores_TE.to(x_TD.dtype), experts_TK, weights_TK.to(x_TD.dtype)

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
        if self.expert_bias_E is not None and self.training and torch.is_grad_enabled():
            self._count_for_bias(experts_TK, keep_TK if mask_T is None else keep_TK & mask_T[:, None])

        if self.expert_parallel_group is not None:
            from excitation_dist.models import expert_parallel

            out_TD = expert_parallel.exchange(self, x_TD, experts_TK, weights_TK, keep_TK, self.expert_parallel_group)
        else:
            out_TD = torch.zeros_like(x_TD)
            for e in range(self.num_experts):
                token_idx, slot = torch.nonzero((experts_TK == e) & keep_TK, as_tuple=True)
                if token_idx.numel() == 0:
                    continue
                h = self.expert_mlp(e, x_TD[token_idx])
                out_TD.index_add_(0, token_idx, h * weights_TK[token_idx, slot, None])
        if self.load_balancing == "none":
            return out_TD.reshape(shape), probs_TE.new_zeros(())
        if self.score_function == "sigmoid":  # the loss's P_e: scores normalized per token
            probs_TE = probs_TE / (probs_TE.sum(-1, keepdim=True) + 1e-20)
        if self.load_balancing == "seq_aux" and len(shape) == 3:  # [B, T, D]: the loss per sequence, averaged
            B, T = shape[0], shape[1]
            losses = [self.load_balancing_loss(probs_TE.view(B, T, -1)[b], experts_TK.view(B, T, -1)[b],
                                               None if mask_T is None else mask_T.view(B, T)[b]) for b in range(B)]
            return out_TD.reshape(shape), torch.stack(losses).mean()
        return out_TD.reshape(shape), self.load_balancing_loss(probs_TE, experts_TK, mask_T)

    def _count_for_bias(self, experts_TK: torch.Tensor, kept_TK: torch.Tensor) -> None:
        with torch.no_grad():  # the sync-free counter Excitation uses (no boolean-mask indexing)
            counts_E = tokens_per_expert(torch.where(kept_TK, experts_TK, -1), self.num_experts).float()
            self._bias_counts_E = counts_E if self._bias_counts_E is None else self._bias_counts_E + counts_E

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): after an optimizer step, raise the bias of experts
        below the mean load and lower it above, by the update rate; loads summed over the data-parallel
        ranks (every rank keeps the same bias). No-op without expert_bias."""
        if self.expert_bias_E is None or self._bias_counts_E is None:
            return
        counts_E = self._bias_counts_E
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)
        self.expert_bias_E += self.expert_bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self._bias_counts_E = None

    def expert_mlp(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self.mlp(x_ND, self.w_in_EDF[e], self.w_out_EFD[e])

    def mlp(self, x_ND: torch.Tensor, w_in_DF: torch.Tensor, w_out_FD: torch.Tensor) -> torch.Tensor:
        """One expert's MLP with the given weights."""
        h_NF = x_ND @ w_in_DF
        if self.swiglu:
            gate_NF, up_NF = h_NF.chunk(2, dim=-1)
            return (F.silu(gate_NF) * up_NF) @ w_out_FD
        return F.gelu(h_NF) @ w_out_FD

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

"""The recipe's ``model.*`` as :class:`~excitation_dist.models.GPTMoEConfig` keywords, shared by the torch
and DeepSpeed backends (each adds its experts' implementation and refuses what it cannot build)."""

from __future__ import annotations

from typing import Any

from excitation_dist.recipe.config import ModelConfig
from excitation_dist.router_options import router_options


def gpt_moe_options(m: ModelConfig) -> dict[str, Any]:
    """Architecture and router keywords of :class:`GPTMoEConfig` for ``m`` (without ``experts``/``ep_size``)."""
    moe = m.moe
    return dict(
        vocab_size=m.vocab_size, seq_len=m.seq_length, d_model=m.hidden_size, n_layers=m.num_layers,
        n_heads=m.num_attention_heads, n_kv_heads=m.num_query_groups, head_dim=m.head_dim,
        d_ff=moe.ffn_hidden_size, dense_d_ff=m.ffn_hidden_size, num_experts=moe.num_experts, top_k=moe.top_k,
        capacity_factor=moe.capacity_factor, aux_loss_coef=moe.aux_loss_coef, z_loss_coef=moe.z_loss_coef,
        position=m.position_embedding, rope_theta=m.rope_theta, norm=m.normalization, norm_eps=m.norm_epsilon,
        qk_norm=m.qk_layernorm, activation=m.activation, shared_expert_d_ff=moe.shared_expert_ffn_hidden_size,
        first_dense_layers=moe.first_dense_layers, tie_embeddings=m.tie_embeddings, **router_options(moe),
    )

"""The GPT-MoE model's settings (:class:`GPTMoEConfig`), checked without torch: the
command line checks a run config's model before it launches any rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from excitation_dist.router_options import RouterOptions


@dataclass
class GPTMoEConfig(RouterOptions):
    vocab_size: int = 256  # bytes
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model / n_heads
    d_ff: int = 128  # hidden size of each routed expert
    dense_d_ff: int = 256  # hidden size of the dense FFN blocks (first_dense_layers)
    num_experts: int = 8
    top_k: int = 2
    experts: Literal["torch", "deepspeed"] = "torch"  # the routed experts' implementation (see the module doc)
    ep_size: int = 1  # expert-parallel ranks (deepspeed experts only)
    capacity_factor: float | None = None  # None: no token dropping
    min_capacity: int = 4  # deepspeed experts only
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float | None = None  # None: 1e-6 for RMSNorm, 1e-5 for LayerNorm
    qk_norm: bool = False
    activation: Literal["gelu", "swiglu"] = "gelu"
    shared_expert_d_ff: int | None = None  # an always-on shared expert of this width beside the routed ones
    first_dense_layers: int = 0
    tie_embeddings: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward (torch experts only)
    # Router options (TopKMoE's): inherited from RouterOptions; deepspeed experts take the defaults only (DeepSpeed's
    # TopKGate).

    def __post_init__(self) -> None:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads} (or set head_dim)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads}")
        if self.experts not in ("torch", "deepspeed"):
            raise ValueError(f"experts must be 'torch' or 'deepspeed', got {self.experts!r}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts {self.num_experts} must be divisible by ep_size {self.ep_size}")
        if self.experts == "torch" and self.ep_size != 1:
            raise ValueError(f"ep_size {self.ep_size}: torch experts are replicated (ep_size 1); "
                             "expert parallelism needs experts='deepspeed'")
        if self.experts == "deepspeed" and self.activation_checkpointing:
            raise ValueError("activation_checkpointing: recomputing DeepSpeed's gate would count its tokens twice; "
                             "use experts='torch' or switch it off")
        if self.experts == "deepspeed":
            changed = [name for name, default in (("score_function", "softmax"), ("topk_scaling_factor", None),
                                                  ("router_num_groups", None), ("expert_bias", False))
                       if getattr(self, name) != default]
            if self.load_balancing == "seq_aux":
                changed.append("load_balancing")
            if not self.normalize_topk and self.top_k > 1:
                changed.append("normalize_topk")
            if changed:
                raise ValueError(f"{', '.join(changed)}: DeepSpeed's TopKGate cannot express this router option; "
                                 "use experts='torch'")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
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

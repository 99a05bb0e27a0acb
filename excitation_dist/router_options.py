"""The router options one MoE layer's top-k choice takes, declared once for the
recipe's ``model.moe`` section and for :class:`~excitation_dist.models.GPTMoEConfig`
(both inherit them, so the YAML keeps its flat ``model.moe.*`` shape).

Kept apart from ``models/`` so that the recipe's configuration does not depend on the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class RouterOptions:
    # Scores: softmax over the experts (Mixtral, OLMoE, Qwen3, DeepSeek-V2) or a sigmoid per expert
    # (DeepSeek-V3). normalize_topk: the k selected scores are divided by their sum (Hugging Face's
    # norm_topk_prob; no effect at top_k 1: the weight is the score); topk_scaling_factor multiplies them
    # afterwards (DeepSeek's routed_scaling_factor).
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    normalize_topk: bool = True
    topk_scaling_factor: float | None = None
    # Group-limited routing (DeepSeek-V3's n_group / topk_group): experts in router_num_groups groups, each
    # token picks among the experts of its router_group_topk best groups. None: no groups.
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    # Load balancing: the auxiliary loss over the micro-batch (aux, Switch/GShard), per sequence (seq_aux,
    # DeepSeek), or none; expert_bias: auxiliary-loss-free balancing (DeepSeek-V3), a per-expert bias added to
    # the scores for the top-k choice only, moved by expert_bias_update_rate x sign(mean load - load) each step.
    load_balancing: Literal["none", "aux", "seq_aux"] = "aux"
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3


ROUTER_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RouterOptions))


def router_options(obj: RouterOptions) -> dict[str, Any]:
    """The router options of ``obj`` (any :class:`RouterOptions`) as keywords."""
    return {name: getattr(obj, name) for name in ROUTER_OPTION_NAMES}

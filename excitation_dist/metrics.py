"""Expert-utilization and multiplier statistics: pure functions on [L, E] tensors.

Conventions (what peers log, see ../shared/FRAMEWORKS.md):
- load ratio: load / ideal load = E * u_k (1 = perfectly balanced, 0 = dead);
- overload factor: max load / mean load = max_k(E * u_k);
- dead experts: experts that processed no token this step;
- entropy: Shannon entropy of u normalized by log(E) (1 = uniform);
- gini_simpson: 1 - sum_k u_k**2 (0 = one expert takes everything).
"""

from __future__ import annotations

import math

import torch

from excitation_dist.strategies import utilization


def layer_stats(counts_LE: torch.Tensor, phi_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer statistics, each a float64 tensor of shape [L]."""
    u = utilization(counts_LE)
    num_experts = u.shape[-1]
    ratio = u * num_experts
    plogp = torch.where(u > 0, u * u.clamp_min(1e-300).log(), torch.zeros_like(u))
    entropy = -plogp.sum(-1) / math.log(num_experts) if num_experts > 1 else torch.ones(u.shape[0], dtype=u.dtype)
    phi = phi_LE.to(torch.float64)
    return {
        "tokens": counts_LE.to(torch.float64).sum(-1),
        "utilization_min": ratio.amin(-1),
        "utilization_max": ratio.amax(-1),
        "utilization_std": ratio.std(-1, unbiased=False),
        "overload_factor": ratio.amax(-1),
        "dead_experts": (counts_LE == 0).sum(-1).to(torch.float64),
        "entropy": entropy,
        "gini_simpson": 1.0 - u.pow(2).sum(-1),
        "multiplier_min": phi.amin(-1),
        "multiplier_max": phi.amax(-1),
        "multiplier_mean": phi.mean(-1),
    }


def flat_metrics(counts_LE: torch.Tensor, phi_LE: torch.Tensor, prefix: str = "excitation") -> dict[str, float]:
    """Scalars for a logger: ``{prefix}/layer_{l:02d}/{stat}`` for every layer and
    ``{prefix}/{stat}`` summarized over layers (mean; max for overload factor and
    multiplier max; min for multiplier min; sum for dead experts)."""
    stats = layer_stats(counts_LE, phi_LE)
    out: dict[str, float] = {}
    for name, per_layer in stats.items():
        for layer, value in enumerate(per_layer.tolist()):
            out[f"{prefix}/layer_{layer:02d}/{name}"] = value
    summary = {
        "overload_factor": "max",
        "utilization_max": "max",
        "multiplier_max": "max",
        "utilization_min": "min",
        "multiplier_min": "min",
        "dead_experts": "sum",
        "tokens": "sum",
    }
    for name, per_layer in stats.items():
        how = summary.get(name, "mean")
        value = {"max": per_layer.max, "min": per_layer.min, "sum": per_layer.sum, "mean": per_layer.mean}[how]()
        out[f"{prefix}/{name}"] = float(value)
    return out

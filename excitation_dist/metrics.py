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


# How each statistic is summarized over layers (mean for the others).
SUMMARY_OVER_LAYERS = {
    "overload_factor": "max",
    "utilization_max": "max",
    "multiplier_max": "max",
    "utilization_min": "min",
    "multiplier_min": "min",
    "dead_experts": "sum",
    "tokens": "sum",
}


def summary_metrics(counts_LE: torch.Tensor, phi_LE: torch.Tensor, prefix: str = "excitation") -> dict[str, float]:
    """``{prefix}/{stat}``: each statistic of :func:`layer_stats` summarized over layers
    (mean; max for overload factor, utilization max and multiplier max; min for the
    minima; sum for dead experts and tokens)."""
    return _summary(layer_stats(counts_LE, phi_LE), prefix)


def flat_metrics(counts_LE: torch.Tensor, phi_LE: torch.Tensor, prefix: str = "excitation",
                 per_layer: bool = True) -> dict[str, float]:
    """Scalars for a logger: :func:`summary_metrics`, and with ``per_layer``
    ``{prefix}/layer_{l:02d}/{stat}`` for every layer."""
    stats = layer_stats(counts_LE, phi_LE)
    out: dict[str, float] = {}
    if per_layer:
        for name, per_layer_L in stats.items():
            for layer, value in enumerate(per_layer_L.tolist()):
                out[f"{prefix}/layer_{layer:02d}/{name}"] = value
    out.update(_summary(stats, prefix))
    return out


def _summary(stats: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    out = {}
    for name, per_layer_L in stats.items():
        how = SUMMARY_OVER_LAYERS.get(name, "mean")
        value = {"max": per_layer_L.max, "min": per_layer_L.min, "sum": per_layer_L.sum, "mean": per_layer_L.mean}[how]()
        out[f"{prefix}/{name}"] = float(value)
    return out

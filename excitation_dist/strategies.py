"""Excitation multipliers: the pure math, no distributed code and no framework.

Every function maps token counts (or utilization fractions) of shape ``[L, E]``
(L MoE layers, E routed experts per layer) to multipliers ``phi_LE`` of the same
shape. Counts are scale-free here: each row is normalized to the utilization
fractions ``u_k = c_k / sum_j c_j`` before use. A row whose counts are all zero
gets ``phi = 1`` for every strategy (never NaN).

Strategies (see ../shared/EXCITATION.md; "decision" marks where the paper is
silent and this project chose):

- ``none``:        phi = 1.
- ``zerosum``:     phi_k = u_k**gamma / mean_j(u_j**gamma). Averages exactly 1;
                   an unused expert gets 0 when gamma > 0. Paper, Figure 1.
- ``positivesum``: phi_k = max(1, zerosum_k). Only amplifies.
- ``expdiff``:     phi_k = exp(gamma * (u_k / mean_j(u_j) - 1)). Decision: the
                   paper's exact formula is not public.
- ``inverted``:    control. ZeroSum applied to utilization mirrored around its
                   midrange, u'_k = max(u) + min(u) - u_k: the least-used expert
                   gets the busiest expert's multiplier (with two experts the
                   multipliers are exactly swapped). Decision.
- ``random``:      control. The layer's ZeroSum multipliers randomly permuted
                   among its experts: same values, not tied to utilization.
                   Needs a generator that all ranks seed alike. Decision.
- ``global``:      control. Every expert of the layer gets one scale, the
                   utilization-weighted mean of the ZeroSum multipliers
                   sum_k u_k * zerosum_k (the learning-rate increase an average
                   token sees): tests "is Excitation just a larger learning
                   rate?". Decision.
"""

from __future__ import annotations

import math

import torch

from excitation_dist.config import STRATEGIES  # the names live with the config, which checks them without torch


def utilization(counts: torch.Tensor) -> torch.Tensor:
    """Row-normalized utilization fractions of ``counts`` [..., E] (float64).

    Rows that sum to zero stay all zero.
    """
    c = counts.detach().to(torch.float64)
    total = c.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(c))


def _zerosum(u_LE: torch.Tensor, gamma: float) -> torch.Tensor:
    p = u_LE.pow(gamma)  # 0**0 == 1: gamma = 0 turns Excitation off
    return p / p.mean(dim=-1, keepdim=True)


def multipliers(
    counts: torch.Tensor,
    strategy: str,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Excitation multipliers for token counts per expert.

    Args:
        counts: ``[L, E]`` (or ``[E]``) non-negative counts or utilization
            fractions per routed expert; any numeric dtype.
        strategy: one of :data:`STRATEGIES`.
        gamma: power-law exponent, ``>= 0``.
        generator: random source for ``strategy="random"`` (ranks must seed
            it identically); the global generator when ``None``. Random keys
            are drawn on the CPU and moved to ``counts``' device.
        validate: check that counts are finite and non-negative (reads values
            on the host: a device sync on a GPU). The controller, whose counts
            are non-negative by construction, passes False.

    Returns:
        float64 tensor of ``counts``' shape. Rows whose counts are all zero are 1.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown Excitation strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if counts.dim() not in (1, 2) or counts.shape[-1] == 0:
        raise ValueError(f"counts must have shape [layers, experts] or [experts], got {tuple(counts.shape)}")
    squeeze = counts.dim() == 1
    c = counts.detach().reshape(-1, counts.shape[-1]).to(torch.float64)
    if validate and (not torch.isfinite(c).all() or (c < 0).any()):
        raise ValueError("counts must be finite and non-negative")

    u = utilization(c)
    active = u.sum(dim=-1, keepdim=True) > 0
    if strategy == "none":
        phi = torch.ones_like(u)
    elif strategy == "zerosum":
        phi = _zerosum(u, gamma)
    elif strategy == "positivesum":
        phi = _zerosum(u, gamma).clamp_min(1.0)
    elif strategy == "expdiff":
        phi = torch.exp(gamma * (u / u.mean(dim=-1, keepdim=True) - 1.0))
    elif strategy == "inverted":
        mirrored = u.amax(dim=-1, keepdim=True) + u.amin(dim=-1, keepdim=True) - u
        phi = _zerosum(mirrored, gamma)
    elif strategy == "random":
        zs = _zerosum(u, gamma)
        keys = torch.rand(zs.shape, generator=generator, dtype=torch.float64)
        phi = torch.gather(zs, -1, keys.argsort(dim=-1).to(zs.device, non_blocking=True))
    else:  # global
        scale = (u * _zerosum(u, gamma)).sum(dim=-1, keepdim=True)
        phi = scale.expand_as(u).clone()
    phi = torch.where(active, phi, torch.ones_like(phi))
    return phi.reshape(-1) if squeeze else phi


def shape_multipliers(
    phi_LE: torch.Tensor,
    *,
    floor: float | None = None,
    ceiling: float | None = None,
    renormalize_energy: bool = False,
    warmup_fraction: float = 1.0,
) -> torch.Tensor:
    """Options beyond the paper, applied to raw multipliers (all off by default).

    Order: energy renormalization, then floor/ceiling clamp, then warm-up.

    - ``renormalize_energy``: divide each layer by its root-mean-square
      multiplier, so sum_k phi_k**2 == E: equal-sized expert updates keep the
      baseline's total update energy (answers the "hidden learning-rate
      increase" critique).
    - ``floor``/``ceiling``: clamp phi into [floor, ceiling]. ``floor > 0``
      keeps unused experts' momentum drift and weight decay alive.
    - ``warmup_fraction`` in [0, 1]: phi = 1 + warmup_fraction * (phi - 1).
    """
    phi = phi_LE.to(torch.float64)
    if renormalize_energy:
        rms = phi.pow(2).mean(dim=-1, keepdim=True).sqrt()
        phi = torch.where(rms > 0, phi / rms.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(phi))
    if floor is not None or ceiling is not None:
        phi = phi.clamp(min=floor, max=ceiling)
    if warmup_fraction < 1.0:
        phi = 1.0 + warmup_fraction * (phi - 1.0)
    return phi

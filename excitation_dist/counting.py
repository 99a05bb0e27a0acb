"""Tokens per expert from routing decisions (torch only, no distributed code)."""

from __future__ import annotations

import torch


def tokens_per_expert(
    expert_indices: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Count (token, expert) assignments per expert.

    Args:
        expert_indices: ``[T, K]`` (or ``[T]``) global expert index of each of a
            token's K assignments; ``-1`` marks an assignment that was dropped
            (capacity) and is not counted.
        num_experts: E, the number of global routed experts.
        token_mask: optional bool ``[T]``; False rows (padding) are not counted.

    Returns:
        int64 ``[E]`` on ``expert_indices``' device.
    """
    idx = expert_indices
    if idx.dim() == 1:
        idx = idx.unsqueeze(-1)
    if token_mask is not None:
        if token_mask.shape != idx.shape[:1]:
            raise ValueError(
                f"token_mask must have shape [tokens] = {tuple(idx.shape[:1])}, got {tuple(token_mask.shape)}"
            )
        idx = idx[token_mask.to(torch.bool)]
    idx = idx.reshape(-1)
    idx = idx[idx >= 0]
    if idx.numel() and int(idx.max()) >= num_experts:
        raise ValueError(f"expert index {int(idx.max())} out of range for {num_experts} experts")
    return torch.bincount(idx.to(torch.int64), minlength=num_experts)

"""Tokens per expert from routing decisions (torch only, no distributed code).

Sync-free: no boolean-mask indexing, no ``.item()`` and no ``bincount`` (each
of which makes a GPU wait for the host): invalid assignments go to an extra
bin that is dropped, and the range check is an asynchronous device assert.
"""

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
        int64 ``[E]`` on ``expert_indices``' device. An index ``>= E`` fails a
        device assert (raised at once on the CPU, at the next sync on a GPU).
    """
    idx = expert_indices
    if idx.dim() == 1:
        idx = idx.unsqueeze(-1)
    if token_mask is not None and token_mask.shape != idx.shape[:1]:
        raise ValueError(
            f"token_mask must have shape [tokens] = {tuple(idx.shape[:1])}, got {tuple(token_mask.shape)}"
        )
    idx = idx.to(torch.int64)
    torch._assert_async(idx.lt(num_experts).all(), f"expert index out of range for {num_experts} experts")
    valid = idx.ge(0)
    if token_mask is not None:
        valid = valid & token_mask.to(torch.bool).unsqueeze(-1)
    bins = torch.where(valid, idx, num_experts).reshape(-1)  # invalid -> the extra bin E
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[:num_experts]

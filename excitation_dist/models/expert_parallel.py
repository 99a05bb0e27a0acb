"""Expert parallelism with token exchange for :class:`~excitation_dist.models.moe.TopKMoE`.

Each rank of an expert-parallel group of size ``ep`` holds experts
``[rank * E / ep, (rank + 1) * E / ep)`` (the stacked weights are DTensors
``Shard(0)`` over the EP mesh dimension, or plain tensors holding the local
experts). A forward routes the rank's own tokens, sends every kept (token,
expert) assignment to the rank that holds the expert (one all-to-all of the
per-expert counts, one of the token rows), runs the local experts on what it
receives, and sends the outputs back (one all-to-all), where they are weighted
and summed per token: the function of the replicated layer, computed where the
experts live. Both token all-to-alls are differentiable, so backward sends the
gradients the other way and each expert's gradient is the sum over the EP
group's tokens.

Gradients: each rank's loss is its own tokens' mean, and data-parallel wrappers
average over the ranks they span. An expert's gradient sums the contributions of
the ``ep`` ranks whose tokens it processed, so the exchange divides it by ``ep``
(in backward, on the local expert weights); FSDP2 over ``dp`` then averages the
rest: the mean over all ``dp x ep`` ranks, what a single process over the global
batch computes (torchtitan gets the same with FSDP2's gradient divide factor).

Excitation counts each rank's own routing before the exchange (the tokens this
rank's batch sends to each expert); the count all-reduce over the ranks that see
different tokens (``dp`` and ``ep``) gives the tokens each expert processed.
The split sizes of the all-to-alls are read on the host (one read per layer and
forward, inherent to a variable-size exchange; Excitation adds none).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in forward; its gradient times ``scale`` in backward."""
    return _ScaleGrad.apply(x, scale)


def local_weight(w: torch.Tensor) -> torch.Tensor:
    """The local experts' rows of a stacked weight: a DTensor's local shard (differentiable), else ``w``."""
    to_local = getattr(w, "to_local", None)
    return to_local() if to_local is not None else w


def exchange(moe, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
             keep_TK: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The routed experts' weighted outputs ``[T, D]`` for this rank's tokens, computed by the
    ranks of ``group`` that hold them."""
    from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

    ep = dist.get_world_size(group)
    num_experts = moe.num_experts
    if num_experts % ep:
        raise ValueError(f"expert parallel needs num_experts ({num_experts}) divisible by the EP size ({ep})")
    local = num_experts // ep
    w_in, w_out = (scale_grad(local_weight(w), 1.0 / ep) for w in (moe.w_in_EDF, moe.w_out_EFD))
    if w_in.shape[0] != local or w_out.shape[0] != local:
        raise ValueError(f"expert parallel over {ep} ranks: each rank must hold {local} experts (Shard(0) of the "
                         f"stacked [E, ...] weights over the EP dimension); this rank holds {w_in.shape[0]}")

    token_A, slot_A = torch.nonzero(keep_TK, as_tuple=True)
    expert_A = experts_TK[token_A, slot_A]
    order = torch.argsort(expert_A, stable=True)  # by expert, hence by destination rank
    token_A, expert_A, weight_A = token_A[order], expert_A[order], weights_TK[token_A, slot_A][order]
    send_E = torch.bincount(expert_A, minlength=num_experts)
    recv_RE = all_to_all_single(send_E, [local] * ep, [local] * ep, group).wait()  # [ep * local]: per source rank
    recv_RE = recv_RE.view(ep, local)
    input_splits = send_E.view(ep, local).sum(1).tolist()  # the host read of the variable-size exchange
    output_splits = recv_RE.sum(1).tolist()
    x_recv = all_to_all_single_autograd(x_TD[token_A], output_splits, input_splits, group)

    # received rows come by source rank, then expert; compute expert by expert
    local_A = torch.repeat_interleave(torch.arange(local, device=x_TD.device).repeat(ep), recv_RE.reshape(-1))
    by_expert = torch.argsort(local_A, stable=True)
    chunks = x_recv[by_expert].split(recv_RE.sum(0).tolist())
    y_sorted = torch.cat([moe.mlp(chunk, w_in[j], w_out[j]) for j, chunk in enumerate(chunks)])
    y_recv = y_sorted[torch.argsort(by_expert)]
    y_back = all_to_all_single_autograd(y_recv, input_splits, output_splits, group)
    return torch.zeros_like(x_TD).index_add(0, token_A, y_back * weight_A[:, None])


def shard_expert_parallel(moe, mesh, *, dp_dim: str = "dp", ep_dim: str = "ep") -> None:
    """torchtitan's expert-parallel layout for one :class:`TopKMoE`: experts ``Shard(0)`` over
    ``mesh[ep_dim]`` (token exchange through ``mesh[ep_dim]``'s group), the router FSDP2 over the
    whole mesh, the expert weights FSDP2 over ``mesh[dp_dim]`` with gradients divided by the
    whole mesh's size (they sum the tokens of the EP group)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in ("w_in_EDF", "w_out_EFD"):
        w = getattr(moe, name)
        setattr(moe, name, torch.nn.Parameter(distribute_tensor(w.detach(), mesh[ep_dim], [Shard(0)])))
    moe.expert_parallel_group = mesh.get_group(ep_dim)
    fully_shard(moe.router, mesh=mesh)
    fully_shard(moe, mesh=mesh[dp_dim])

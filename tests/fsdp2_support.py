"""Building blocks of the FSDP2 / DTensor tests: layouts of the GPT-MoE on a CPU
DeviceMesh, the data, independent counts and the references.

Expert parallel comes two ways. ``ep_alltoall`` is the real thing: tokens are
exchanged all-to-all with the ranks that hold their experts
(:mod:`excitation_dist.models.expert_parallel`). The other EP layouts test the
layout, not the token exchange: the stacked
``[E, ...]`` expert weights are DTensors ``Shard(0)`` over the ``ep`` mesh
dimension (and ``Shard(0)``, or ``Shard(1)``, over ``dp``), so each rank holds
and steps only a piece of its EP rank's experts, exactly as with EP. The forward
(:class:`GatheredExpertsMoE`) gathers the full expert weights with DTensor's
``redistribute`` instead of sending tokens all-to-all: the same function and
the same gradients (backward reduce-scatters them onto the shards, averaged
over the ranks), with no all-to-all to write. In ``ep_fsdp_native`` FSDP2
itself gathers over ``dp`` and this layer over ``ep``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from excitation_dist.models import GPTMoE, GPTMoEConfig
from excitation_dist.models.expert_parallel import scale_grad
from excitation_dist.models.moe import TopKMoE

MODEL = GPTMoEConfig(vocab_size=32, seq_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=6, num_experts=4, top_k=2,
                     aux_loss_coef=0.01)
SEQS_PER_MICRO = 2


@dataclass(frozen=True)
class Case:
    """One distributed run. ``layout``: ``fsdp`` (1-D mesh ``dp``), ``hsdp``
    (``replicate`` x ``shard``), ``ep_fsdp`` (``ep`` x ``dp``: experts Shard(0) x
    ``Shard(expert_shard_dim)`` over ``dp`` as one DTensor, the rest HSDP),
    ``ep_fsdp_native`` (``dp`` x ``ep``: experts Shard(0) over ``ep``, then
    ``fully_shard`` over ``dp``: FSDP2's own ``_StridedShard`` layout), ``ep_alltoall`` (the same
    layout with real expert parallelism: tokens exchanged all-to-all over ``ep``). ``expert_shard_dim``:
    the shard dimension of the expert weights over the data-parallel dimension
    (1 cuts every expert; FSDP2 refuses uneven splits of a dimension other
    than 0, so uneven cuts through an expert take ``flat_experts``)."""

    name: str
    layout: str
    micro: int = 1
    strategy: str = "zerosum"
    optim: str = "foreach"  # or "fused" (takes the blend path)
    update: str = "auto"
    checkpointing: bool = False
    num_experts: int = 4
    d_ff: int = 6
    expert_shard_dim: int = 0
    flat_experts: bool = False  # expert weights stored [E * D, F] and [E * F, D]: Shard(0) cuts through experts
    steps: int = 2
    check_syncs: bool = False

    @property
    def model(self) -> GPTMoEConfig:
        return replace(MODEL, num_experts=self.num_experts, d_ff=self.d_ff, activation_checkpointing=self.checkpointing)


def chunk(step: int, rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    return torch.randint(0, MODEL.vocab_size, (SEQS_PER_MICRO, MODEL.seq_len + 1), generator=g)


def _full(w: torch.Tensor) -> torch.Tensor:
    """The full expert weight from its shards; backward: the local gradients
    summed onto the shards (reduce-scatter) and averaged over the ranks."""
    from torch.distributed.tensor import Partial, Replicate

    mesh = w.device_mesh
    full = w.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=[Partial()] * mesh.ndim)
    return scale_grad(full, 1.0 / mesh.size())


class GatheredExpertsMoE(TopKMoE):
    """TopKMoE whose stacked expert weights are DTensors sharded over ``ep`` (x ``dp``)."""

    _full_weights = None

    def forward(self, x, token_mask=None):
        self._full_weights = (_full(self.w_in_EDF), _full(self.w_out_EFD))
        try:
            out, aux = super().forward(x, token_mask)
        finally:
            self._full_weights = None
        return out.clone(), aux  # not a view: FSDP2 (ep_fsdp_native wraps this module) warns about views

    def expert_mlp(self, e, x_ND):
        w_in, w_out = self._full_weights
        h = x_ND @ w_in[e]
        return torch.nn.functional.gelu(h) @ w_out[e]


class FlatExpertsMoE(TopKMoE):
    """TopKMoE whose expert weights are stored flat along dim 0 (``[E * D, F]``,
    ``[E * F, D]``): expert e is rows ``[e * D, (e + 1) * D)``, so an FSDP2
    ``Shard(0)`` boundary can fall inside an expert (and uneven splits do)."""

    def expert_mlp(self, e, x_ND):
        E = self.num_experts
        w_in = self.w_in_EDF.view(E, -1, self.w_in_EDF.shape[-1])
        w_out = self.w_out_EFD.view(E, -1, self.w_out_EFD.shape[-1])
        return torch.nn.functional.gelu(x_ND @ w_in[e]) @ w_out[e]


def flatten_experts(model: GPTMoE) -> None:
    for m in experts_of(model):
        for name in ("w_in_EDF", "w_out_EFD"):
            w = getattr(m, name)
            setattr(m, name, torch.nn.Parameter(w.detach().reshape(-1, w.shape[-1]).clone()))
        m.__class__ = FlatExpertsMoE


def experts_of(model: GPTMoE) -> list[TopKMoE]:
    return [block.ffn.experts for block in model.blocks]


def build(case: Case, seed: int = 0) -> GPTMoE:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    return GPTMoE(case.model)


def shard(model: GPTMoE, case: Case):
    """Apply the case's layout in place; returns the mesh. With activation
    checkpointing the model's own ``checkpoint(block)`` must not contain FSDP2's
    hooks (the recompute would save a different number of tensors), so only the
    root is an FSDP unit then (torchtitan instead wraps each block in its
    checkpoint before ``fully_shard``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    world = dist.get_world_size()
    experts = experts_of(model)
    expert_weights = {id(w) for m in experts for w in (m.w_in_EDF, m.w_out_EFD)}

    def placement(p):
        return Shard(case.expert_shard_dim) if id(p) in expert_weights else Shard(0)

    if case.flat_experts:
        flatten_experts(model)
    if case.layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    elif case.layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    elif case.layout == "ep_fsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "dp"))
        ignored = set()
        for m in experts:
            for name in ("w_in_EDF", "w_out_EFD"):
                w = getattr(m, name)
                dt = distribute_tensor(w.detach(), mesh, [Shard(0), Shard(case.expert_shard_dim)])
                setattr(m, name, torch.nn.Parameter(dt))
                ignored.add(getattr(m, name))
            m.__class__ = GatheredExpertsMoE
        for block in model.blocks if not case.checkpointing else ():
            fully_shard(block, mesh=mesh, ignored_params=ignored)  # HSDP: replicated over ep, sharded over dp
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return mesh
    elif case.layout == "ep_alltoall":
        # real expert parallelism: tokens exchanged all-to-all over ep (excitation_dist.models.expert_parallel),
        # experts Shard(0) over ep and FSDP2 over dp, the rest FSDP2 over (dp, ep)
        from excitation_dist.models.expert_parallel import shard_expert_parallel

        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "ep"))
        for m in experts:
            shard_expert_parallel(m, mesh)
        for block in model.blocks if not case.checkpointing else ():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return mesh
    elif case.layout == "ep_fsdp_native":
        # torchtitan's layout: experts Shard(0) over ep (distribute_tensor), then FSDP2 over dp on the expert
        # weights alone (its DTensor path: dp comes first in the mesh, so FSDP2 writes _StridedShard(0)); the rest
        # (router included) HSDP over (dp, ep). In forward FSDP2 gathers over dp; ep gathers in GatheredExpertsMoE.
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "ep"))
        for m in experts:
            for name in ("w_in_EDF", "w_out_EFD"):
                w = getattr(m, name)
                setattr(m, name, torch.nn.Parameter(distribute_tensor(w.detach(), mesh["ep"], [Shard(0)])))
            m.__class__ = GatheredExpertsMoE
            fully_shard(m.router, mesh=mesh)
            fully_shard(m, mesh=mesh["dp"])
        for block in model.blocks if not case.checkpointing else ():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return mesh
    else:
        raise ValueError(case.layout)
    for block in model.blocks if not case.checkpointing else ():
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return mesh


def optimizer(params, case: Case, lr: float = 1e-2, wd: float = 0.1) -> torch.optim.Optimizer:
    flag = {"foreach": {"foreach": True}, "fused": {"fused": True}, "single": {"foreach": False}}[case.optim]
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **flag)


def router_counts(model: GPTMoE, num_experts: int) -> torch.Tensor:
    """Independent local counts: top-k of each router's logits (no capacity),
    from forward hooks on grad-enabled forwards outside backward."""
    counts = torch.zeros(len(model.blocks), num_experts, dtype=torch.int64)

    def hook_for(layer):
        def hook(module, inputs, logits):
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                idx = logits.detach().topk(MODEL.top_k, dim=-1).indices  # saves nothing for backward
                counts[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts)
        return hook

    for layer, m in enumerate(experts_of(model)):
        m.router.register_forward_hook(hook_for(layer))
    return counts


def phi_of(counts_LE: torch.Tensor, strategy: str) -> torch.Tensor:
    """The paper's multipliers with gamma = 1, written out here."""
    zs = counts_LE.double() / counts_LE.double().mean(-1, keepdim=True)
    return zs if strategy == "zerosum" else zs.clamp(min=1.0)


def full_params(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter as a full tensor (collective on DTensors: call on all ranks)."""
    out = []
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append((name, full.detach()))
    return out

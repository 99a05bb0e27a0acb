"""Translate a model whose expert weights are DTensors (FSDP2, expert parallel,
HSDP) and its ``torch.optim`` optimizer into the core's terms."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from excitation_dist.config import ConfigError, ExcitationConfig
from excitation_dist.core import Excitation, ExpertSegment
from excitation_dist.fsdp2.placements import (PlacementError, local_expert_ranges, local_runs, placement_name,
                                               shard_indices, split_experts)
from excitation_dist.segments import ExpertRange
from excitation_dist.torch.backend import bind_layers, detach, excitable_layers  # the same layer protocol

__all__ = ["attach", "detach", "count_group", "owned_expert_segments"]

EXPERT_PARALLEL_DIMS = ("ep",)


def _refuse_fsdp1(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    flat = [p for g in optimizer.param_groups for p in g["params"] if getattr(p, "_is_flat_param", False)
            or type(p).__name__ == "FlatParameter"]
    if wrapped or flat:
        raise ConfigError(
            "excitation_dist.fsdp2 found FSDP1 (FullyShardedDataParallel): its flat parameters concatenate "
            "many parameters into one FlatParameter, which this adapter does not map to experts. Shard with "
            "FSDP2 instead: torch.distributed.fsdp.fully_shard(module, mesh=...) per block, then the root; "
            "the parameters become DTensors, which excitation_dist.fsdp2.attach maps."
        )


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def owned_expert_segments(
    layers: Sequence[nn.Module],
    stepped: set[int],
    names: Mapping[int, str],
    expert_parallel_dims: Sequence[str] = EXPERT_PARALLEL_DIMS,
) -> list[ExpertSegment]:
    """Segments of the local shards of every expert parameter of ``layers``
    (index = Excitation layer), in local-shard coordinates.

    A DTensor's local shard is mapped from its placements and this rank's mesh
    coordinate (:mod:`excitation_dist.fsdp2.placements`); a plain tensor is held
    whole. Raises :class:`ConfigError` naming the parameter and placement for a
    placement that cannot be mapped (``Partial``), for an expert-parallel mesh
    dimension (named in ``expert_parallel_dims``) that splits one expert's
    elements across its ranks, and for a trainable expert parameter that the
    optimizer does not step.
    """
    segments: list[ExpertSegment] = []
    for layer, module in enumerate(layers):
        by_param: dict[int, tuple[nn.Parameter, list[ExpertRange]]] = {}
        for sl in module.excitation_expert_slices():
            end = sl.param.numel() if sl.end is None else sl.end  # global (flattened full tensor) coordinates
            by_param.setdefault(id(sl.param), (sl.param, []))[1].append(ExpertRange(sl.expert, sl.start, end))
        for key, (param, experts) in by_param.items():
            name = names.get(key, f"<expert parameter of MoE layer {layer}>")
            if key not in stepped:
                if param.requires_grad:
                    raise ValueError(f"expert parameter {name} is not stepped by the optimizer: build the optimizer "
                                     "over all expert parameters (after fully_shard) before attach()")
                continue
            if not _is_dtensor(param):
                runs = [(0, 0, param.numel())]
            else:
                runs = _dtensor_runs(param, name, experts, expert_parallel_dims)
            for r in local_expert_ranges(runs, experts):
                segments.append(ExpertSegment(param, r.start, r.end, layer, r.expert))
    return segments


def _dtensor_runs(param, name: str, experts: list[ExpertRange], expert_parallel_dims: Sequence[str]):
    from torch.distributed.tensor import Replicate

    mesh, placements = param.device_mesh, tuple(param.placements)
    described = ", ".join(placement_name(p) for p in placements)
    where = f"expert parameter {name} (placements ({described}) on mesh {tuple(mesh.mesh_dim_names or ())})"
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the parameter's mesh: it holds nothing of it
        return []
    try:
        index = shard_indices(param.shape, mesh.shape, coordinate, placements)
    except PlacementError as err:
        raise ConfigError(f"{where}: {err}. Excitation scales the update of the elements a rank steps; reduce the "
                          "parameter (redistribute to Shard/Replicate) before the optimizer holds it.") from None
    runs = local_runs(param.shape, index)
    if sum(n for _, _, n in runs) != param._local_tensor.numel():
        raise ConfigError(f"{where}: the placements describe {sum(n for _, _, n in runs)} local elements, the "
                          f"local shard holds {param._local_tensor.numel()}; this DTensor layout is not understood")
    names = tuple(mesh.mesh_dim_names or ())
    ep_dims = [i for i, n in enumerate(names) if n in expert_parallel_dims]
    if ep_dims and any(type(placements[i]).__name__ != "Replicate" for i in ep_dims):
        # What one expert-parallel rank holds, over all its data-parallel shards: only whole experts.
        ep_only = tuple(p if i in ep_dims else Replicate() for i, p in enumerate(placements))
        held = local_runs(param.shape, shard_indices(param.shape, mesh.shape, coordinate, ep_only))
        split = split_experts(held, experts)
        if split:
            ep = ", ".join(f"{names[i]}: {placement_name(placements[i])}" for i in ep_dims)
            raise ConfigError(f"{where}: the expert-parallel placement ({ep}) splits expert(s) {split} across "
                              "expert-parallel ranks (each expert-parallel rank must hold whole experts: shard the "
                              "stacked expert dimension into chunks of whole experts, e.g. Shard(0) of [E, ...] "
                              "with E divisible by the expert-parallel size)")
    return runs


def count_group(mesh=None, token_dims: Sequence[str] | None = None) -> dist.ProcessGroup | None:
    """The process group of the ranks that see different tokens: the mesh
    dimensions ``token_dims`` of ``mesh`` (data-parallel replicate and shard,
    expert parallel, context parallel; not tensor parallel, whose ranks see the
    same tokens). ``None`` (the whole world) without a mesh, or when those
    dimensions span the world."""
    if mesh is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    dims = tuple(token_dims) if token_dims is not None else names
    unknown = [d for d in dims if d not in names]
    if unknown or not dims:
        raise ConfigError(f"token_dims {list(dims)}: the mesh has dimensions {list(names)}")
    size = 1
    for d in dims:
        size *= mesh.size(names.index(d))
    if size == dist.get_world_size():
        return None
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    return mesh[dims]._flatten().get_group()


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ExcitationConfig | Mapping[str, Any] | None = None,
    *,
    mesh=None,
    token_dims: Sequence[str] | None = None,
    process_group: dist.ProcessGroup | None = None,
    expert_parallel_dims: Sequence[str] = EXPERT_PARALLEL_DIMS,
) -> Excitation:
    """Enable Excitation for every :class:`~excitation_dist.torch.ExcitableMoE`
    layer of a model sharded with FSDP2 / DTensors.

    Args:
        model: the model after ``fully_shard`` (and any ``distribute_tensor`` of
            expert weights). Its MoE layers describe their experts in the global
            (full tensor) coordinates of each expert parameter.
        optimizer: a ``torch.optim`` optimizer built over the sharded parameters
            (it steps the DTensors; foreach or fused).
        config: :class:`ExcitationConfig` or mapping (defaults: the paper's ZeroSum).
        mesh, token_dims: the count all-reduce runs over the dimensions
            ``token_dims`` of ``mesh`` (default: all of them), the ranks that see
            different tokens. Without a mesh: ``process_group``, else the world.
        expert_parallel_dims: names of mesh dimensions that are expert parallel:
            a placement over them must give each rank whole experts.

    The count all-reduce is issued by the optimizer step (one per step); to
    overlap it with backward, call ``excitation.reduce_counts_async()`` after the
    step's last forward.
    """
    _refuse_fsdp1(model, optimizer)
    layers, num_experts = excitable_layers(model, detach_hint="excitation_dist.fsdp2.detach(model)")
    if mesh is not None and process_group is not None:
        raise ConfigError("pass either mesh (and token_dims) or process_group, not both")
    group = count_group(mesh, token_dims) if mesh is not None else process_group

    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    segments = owned_expert_segments(layers, stepped, _param_names(model), expert_parallel_dims)
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()  # counts then live where the collective runs
    excitation = Excitation(config, len(layers), num_experts, group, device=None if distributed else device)
    excitation.set_segments(segments)
    bind_layers(excitation, layers)
    excitation.hook_optimizer(optimizer)
    return excitation

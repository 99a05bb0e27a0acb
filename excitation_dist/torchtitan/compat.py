"""Every torchtitan-specific fact this adapter relies on, in one place.

Checked against torchtitan 0.3.0 (PyPI), reading ``models/common/moe.py``
(``MoE``: ``router`` is a ``TokenChoiceTopKRouter`` whose forward returns
``(topk_scores_BLK, topk_expert_ids_BLK, scores_BLE)``, the ids after the
load-balancing bias; ``routed_experts.inner_experts`` is a ``GroupedExperts``
whose parameters all stack the experts on dimension 0: ``w1_EFD``, ``w2_EDF``,
``w3_EFD``, and GPT-OSS's weights and biases), ``distributed/fsdp.py`` and
``models/common/moe_sharding.py`` (expert weights: FSDP2 ``Shard(0)`` or
``Shard(1)`` over the data-parallel mesh, ``Shard(0)`` over ``ep`` under expert
parallel, FSDP2 over ``efsdp`` on top), ``components/optimizer/optimizer.py``
(``OptimizersContainer``: one ``torch.optim`` optimizer per optimizer name and
model part in ``.optimizers``; its ``state_dict`` is flat and FQN-keyed and its
loader ignores keys it does not own) and ``config/override.py`` (the
``--override.imports`` mechanism). Outside the checked range
:func:`check_version` refuses to run: a silent change in any of these facts
would make Excitation count or scale the wrong elements.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import nn

from excitation_dist import versions
from excitation_dist.config import ConfigError
from excitation_dist.torch.backend import ExpertSlice

CHECKED_RANGE = versions.GATES["torchtitan"].specifier

# Mesh dimensions (torchtitan's names) whose ranks see the same tokens: the count all-reduce leaves them out.
SAME_TOKEN_DIMS = ("tp",)


def check_version(version: str | None = None) -> None:
    """Refuse a torchtitan version outside the range this adapter was checked against."""
    if version is None:
        import torchtitan

        version = torchtitan.__version__
    versions.check("torchtitan", version)


class MoELayer(NamedTuple):
    """One torchtitan MoE layer: its module path, router and grouped experts."""

    fqn: str
    router: nn.Module
    experts: nn.Module


def moe_layers(model_parts: list[nn.Module]) -> list[MoELayer]:
    """The MoE layers of this rank's model parts, in module order (Excitation's
    layer index). Under pipeline parallelism: this stage's layers only."""
    from torchtitan.models.common.moe import MoE

    found = []
    for part in model_parts:
        for fqn, module in part.named_modules():
            if isinstance(module, MoE):
                found.append(MoELayer(fqn, module.router, module.routed_experts.inner_experts))
    return found


class StackedExperts:
    """A torchtitan ``GroupedExperts`` in the terms of
    :class:`excitation_dist.torch.ExcitableMoE`: every parameter stacks the
    ``num_experts`` experts on dimension 0, so expert ``e`` is the ``e``-th
    equal chunk of the flattened global (full) tensor, whatever DTensor
    placements hold it."""

    def __init__(self, layer: MoELayer) -> None:
        self.fqn = layer.fqn
        self.num_experts = int(layer.experts.num_experts)
        self.params = [p for p in layer.experts.parameters()]
        for name, p in layer.experts.named_parameters():
            if p.dim() == 0 or p.shape[0] != self.num_experts:
                raise ConfigError(
                    f"{layer.fqn}.routed_experts.inner_experts.{name} has global shape {tuple(p.shape)}: "
                    f"expected the {self.num_experts} experts stacked on dimension 0 (torchtitan 0.3's GroupedExperts)"
                )

    def excitation_expert_slices(self) -> Iterator[ExpertSlice]:
        for p in self.params:
            per_expert = p.numel() // self.num_experts  # a DTensor's numel() is its global numel
            for e in range(self.num_experts):
                yield ExpertSlice(p, e, e * per_expert, (e + 1) * per_expert)


def routed_expert_ids(output: tuple) -> torch.Tensor:
    """``topk_expert_ids_BLK`` from a ``TokenChoiceTopKRouter`` output: this
    rank's tokens (a DTensor output's local shard: under expert parallel the
    router runs on the rank's own token shard)."""
    ids = output[1]
    from torch.distributed.tensor import DTensor

    if isinstance(ids, DTensor):
        ids = ids.to_local()
    return ids


def refuse_tensor_parallel(experts: list[StackedExperts]) -> None:
    """Tensor parallel (a ``tp`` mesh dimension of size > 1 on expert weights)
    is refused: not tested with this adapter (its ranks see the same tokens
    without expert parallel, and different ones with it)."""
    from torch.distributed.tensor import DTensor

    for layer in experts:
        for p in layer.params:
            if not isinstance(p, DTensor):
                continue
            names = tuple(p.device_mesh.mesh_dim_names or ())
            for dim in SAME_TOKEN_DIMS:
                if dim in names and p.device_mesh.size(names.index(dim)) > 1:
                    raise ConfigError(
                        f"{layer.fqn}: expert weights are sharded over the tensor-parallel mesh dimension '{dim}'; "
                        "excitation_dist.torchtitan supports data parallel (FSDP2, HSDP), context parallel and "
                        "expert parallel, not tensor parallel (set parallelism.tensor_parallel_degree 1)"
                    )

"""Translate torchtitan's MoE model parts and ``OptimizersContainer`` into the
core's terms: counts from its routers, expert shards from its DTensors, the
excited update inside its ``torch.optim`` steps."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from excitation_dist.config import ConfigError, ExcitationConfig
from excitation_dist.core import Excitation
from excitation_dist.counting import tokens_per_expert
from excitation_dist.fsdp2.backend import count_group, owned_expert_segments
from excitation_dist.torchtitan.compat import (SAME_TOKEN_DIMS, StackedExperts, check_version, moe_layers,
                                               refuse_tensor_parallel, routed_expert_ids)

__all__ = ["attach", "detach", "paused"]

_ATTACHED = "_excitation_torchtitan"
_WIRING: "weakref.WeakKeyDictionary[Excitation, _Wiring]" = weakref.WeakKeyDictionary()


def _count_group(experts: list[StackedExperts]) -> dist.ProcessGroup | None:
    """The ranks that see different tokens for these layers: the mesh of the
    expert weights (torchtitan's data-parallel mesh, or its sparse mesh
    ``efsdp`` x ``ep`` under expert parallel; both span the data and context
    parallel ranks of one pipeline stage), less any tensor-parallel dimension.
    ``None``: the whole world (or no reduction when not distributed)."""
    from torch.distributed.tensor import DTensor

    for layer in experts:
        for p in layer.params:
            if isinstance(p, DTensor):
                names = tuple(p.device_mesh.mesh_dim_names or ())
                return count_group(p.device_mesh, [n for n in names if n not in SAME_TOKEN_DIMS])
    return None


def attach(
    model_parts: list[nn.Module],
    optimizers: Any,
    config: ExcitationConfig | Mapping[str, Any] | None = None,
) -> Excitation | None:
    """Enable Excitation for the MoE layers of torchtitan model parts.

    Args:
        model_parts: this rank's model parts after torchtitan's ``parallelize``
            (FSDP2 / HSDP / EP applied), e.g. ``trainer.model_parts``.
        optimizers: torchtitan's ``OptimizersContainer`` built over them (or a
            single ``torch.optim`` optimizer).
        config: :class:`ExcitationConfig` or mapping (defaults: the paper's ZeroSum).

    Counts every training forward of each ``TokenChoiceTopKRouter`` once per token
    (activation recompute not counted again), all-reduces the ``[L, E]`` counts
    once per optimizer step, and scales each expert's update inside the inner
    optimizers' steps (after torchtitan's gradient clipping). Shares nothing
    with torchtitan's load-balancing bias update (its ``tokens_per_expert_E``
    buffer is neither read nor reset). Returns None, with nothing hooked, for a
    pipeline stage without MoE layers.
    """
    check_version()
    layers = moe_layers(model_parts)
    if not layers:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return None  # a pipeline stage with dense layers only
        raise ConfigError("excitation_dist.torchtitan found no torchtitan MoE layer (torchtitan.models.common.moe.MoE) "
                          "in the model: Excitation scales routed experts' updates")
    experts = [StackedExperts(layer) for layer in layers]
    counts = {e.num_experts for e in experts}
    if len(counts) != 1:
        raise ConfigError(f"all MoE layers must have the same number of routed experts, found {sorted(counts)}")
    if any(getattr(layer.router, _ATTACHED, None) is not None for layer in layers):
        raise RuntimeError("this model already has Excitation attached; call excitation_dist.torchtitan.detach first")
    refuse_tensor_parallel(experts)

    inner = list(getattr(optimizers, "optimizers", [optimizers]))
    stepped = {id(p) for opt in inner for g in opt.param_groups for p in g["params"]}
    names = {id(p): name for part in model_parts for name, p in part.named_parameters(remove_duplicate=False)}
    segments = owned_expert_segments(experts, stepped, names)

    distributed = dist.is_available() and dist.is_initialized()
    device = None if distributed else next(model_parts[0].parameters()).device
    excitation = Excitation(config, len(layers), counts.pop(), _count_group(experts), device=device)
    excitation.set_segments(segments)

    num_experts = excitation.num_experts
    router_hooks = [
        excitation.hook_router(index, layer.router,
                               lambda args, kwargs, output: tokens_per_expert(routed_expert_ids(output), num_experts))
        for index, layer in enumerate(layers)
    ]
    for layer in layers:
        setattr(layer.router, _ATTACHED, excitation)
    wiring = _Wiring(excitation, inner, optimizers, router_hooks, [layer.router for layer in layers])
    wiring.hook()
    _WIRING[excitation] = wiring
    return excitation


class _Wiring:
    """The hooks of one attachment: the routers' (counting) and the optimizers'
    (the excited update in each inner optimizer; the step ends after the whole
    container step, which may run several inner optimizers)."""

    def __init__(self, excitation: Excitation, inner: list, container: Any, router_hooks: list, routers: list) -> None:
        self._excitation = weakref.ref(excitation)  # the global registry must not keep it alive
        self.inner, self.container = inner, container
        self.router_hooks, self.routers = router_hooks, routers
        self.hooked = False

    @property
    def excitation(self) -> Excitation:
        return self._excitation()

    def hook(self) -> None:
        excitation = self.excitation
        if self.inner == [self.container]:  # a plain torch optimizer: its own post-hook ends the step
            excitation.hook_optimizer(self.container)
        else:
            for opt in self.inner:
                excitation.hook_optimizer(opt, end_step_after=False)
            # torch.optim.Optimizer's hooks: the container's step() runs them around all its inner steps
            excitation._hook_handles.append(
                self.container.register_step_post_hook(lambda *args, **kwargs: excitation.end_step()))
        self.hooked = True

    def unhook_optimizers(self) -> None:
        self.excitation.remove_hooks()
        self.hooked = False

    def remove(self) -> None:
        self.unhook_optimizers()
        for handle in self.router_hooks:
            handle.remove()
        for router in self.routers:
            setattr(router, _ATTACHED, None)


@contextmanager
def paused(excitation: Excitation | None) -> Iterator[None]:
    """Run optimizer steps that are not training steps without Excitation:
    torchtitan's checkpoint code materializes a fresh optimizer's state with a
    zero-gradient step at lr 0 (``init_optim_state``), which must neither
    consume counts nor advance Excitation's step counter."""
    wiring = _WIRING.get(excitation) if excitation is not None else None
    if wiring is None or not wiring.hooked:
        yield
        return
    wiring.unhook_optimizers()
    try:
        yield
    finally:
        wiring.hook()


def detach(excitation: Excitation | None) -> None:
    """Remove Excitation's router and optimizer hooks."""
    wiring = _WIRING.get(excitation) if excitation is not None else None
    if wiring is not None:
        wiring.remove()

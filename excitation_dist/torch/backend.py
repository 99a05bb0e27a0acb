"""Translate a plain PyTorch model and optimizer into the core's terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from excitation_dist.config import ExcitationConfig
from excitation_dist.core import Excitation
from excitation_dist.counting import tokens_per_expert
from excitation_dist.segments import ExpertRange
from excitation_dist.shards import SteppedPiece, expert_segments

_BINDING = "_excitation_binding"


class ExpertSlice(NamedTuple):
    """Elements ``[start, end)`` of ``param.view(-1)`` belong to global ``expert``
    (``end=None``: to the end of the parameter)."""

    param: nn.Parameter
    expert: int
    start: int = 0
    end: int | None = None


@runtime_checkable
class ExcitableMoE(Protocol):
    """What an MoE layer provides to take part in Excitation."""

    num_experts: int

    def excitation_expert_slices(self) -> Iterable[ExpertSlice]: ...


@dataclass
class _Binding:
    excitation: Excitation
    layer: int


def report_expert_counts(
    module: nn.Module,
    expert_indices: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    processed_mask: torch.Tensor | None = None,
) -> None:
    """Report one forward's routing of an attached MoE layer. Cheap no-op when
    the layer is not attached or in eval mode; which training forwards count is
    :meth:`Excitation.count_this_forward`.

    Args:
        module: the MoE layer (attached with :func:`attach`).
        expert_indices: ``[T, K]`` global expert of each token's K assignments;
            ``-1`` for assignments that were dropped.
        token_mask: optional bool ``[T]``, False for padding tokens (not counted).
        processed_mask: optional bool ``[T, K]``, False where capacity dropped
            the assignment. Used when the config counts ``processed`` tokens and
            ignored for ``routed`` counts.

    Activation recompute (``torch.utils.checkpoint``, either ``use_reentrant``
    setting) counts each token once: the original forward when it ran with
    grad enabled, else the recompute in backward.
    """
    binding: _Binding | None = getattr(module, _BINDING, None)
    if binding is None or not binding.excitation.count_this_forward(binding.layer, module.training):
        return
    idx = expert_indices
    if processed_mask is not None and binding.excitation.config.counts == "processed":
        idx = torch.where(processed_mask, idx, torch.full_like(idx, -1))
    binding.excitation.record(binding.layer, tokens_per_expert(idx, binding.excitation.num_experts, token_mask))


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ExcitableMoE)]


def excitable_layers(model: nn.Module, detach_hint: str = "excitation_dist.torch.detach(model)") -> tuple[list[nn.Module], int]:
    """The model's :class:`ExcitableMoE` layers (in module order: Excitation's layer index)
    and their common number of routed experts; refuses a model without any, with mixed
    expert counts, or already attached (shared by every adapter of this layer protocol)."""
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(
            "attach() found no MoE layer: a layer takes part by defining num_experts and "
            "excitation_expert_slices() (see excitation_dist.torch.ExcitableMoE)"
        )
    experts = {m.num_experts for m in layers}
    if len(experts) != 1:
        raise ValueError(f"all MoE layers must have the same number of routed experts, found {sorted(experts)}")
    if any(getattr(m, _BINDING, None) is not None for m in layers):
        raise RuntimeError(f"this model already has Excitation attached; call {detach_hint} first")
    return layers, experts.pop()


def bind_layers(excitation: Excitation, layers: list[nn.Module]) -> None:
    """Route each layer's :func:`report_expert_counts` to ``excitation`` as its layer index."""
    for layer, module in enumerate(layers):
        setattr(module, _BINDING, _Binding(excitation, layer))


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ExcitationConfig | Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    *,
    overlap: bool = True,
) -> Excitation:
    """Enable Excitation for every :class:`ExcitableMoE` layer of ``model``.

    Args:
        model: the model, optionally wrapped in ``DistributedDataParallel``.
        optimizer: any torch optimizer over (at least) all trainable expert parameters.
        config: :class:`ExcitationConfig` or mapping (defaults: the paper's ZeroSum).
        process_group: ranks holding distinct tokens; default: the world when
            torch.distributed is initialized, else no reduction.
        overlap: with DDP, issue the count all-reduce right after the forward
            that syncs gradients (the last micro-batch), overlapping backward.
            Loops that accumulate gradients without ``no_sync()`` need False.

    Returns:
        The :class:`Excitation` controller (metrics, state_dict, last multipliers).
    """
    layers, num_experts = excitable_layers(model)
    device = next(model.parameters()).device
    excitation = Excitation(config, len(layers), num_experts, process_group, device=device)
    expert_params_by_layer = []
    for module in layers:
        by_param: dict[int, tuple[nn.Parameter, list[ExpertRange]]] = {}
        for sl in module.excitation_expert_slices():
            end = sl.param.numel() if sl.end is None else sl.end
            by_param.setdefault(id(sl.param), (sl.param, []))[1].append(ExpertRange(sl.expert, sl.start, end))
        expert_params_by_layer.append(list(by_param.values()))
    stepped = [SteppedPiece(p, p, 0, p.numel()) for group in optimizer.param_groups for p in group["params"]]
    segments = expert_segments(expert_params_by_layer, stepped, every_param_stepped=True,
                               hint="A trainable expert parameter is not in the optimizer: build the optimizer over "
                                    "all expert parameters before attach().")
    excitation.set_segments(segments)
    bind_layers(excitation, layers)
    excitation.hook_optimizer(optimizer)

    if overlap and isinstance(model, nn.parallel.DistributedDataParallel):

        def issue_after_sync_forward(mod: nn.Module, args: Any, output: Any) -> None:
            if mod.training and torch.is_grad_enabled() and mod.require_backward_grad_sync:
                excitation.reduce_counts_async()

        excitation._hook_handles.append(model.register_forward_hook(issue_after_sync_forward))
    return excitation


def detach(model: nn.Module) -> None:
    """Remove Excitation from ``model`` (and its optimizer hooks)."""
    for m in _moe_layers(model):
        binding = getattr(m, _BINDING, None)
        if binding is not None:
            binding.excitation.remove_hooks()
            setattr(m, _BINDING, None)

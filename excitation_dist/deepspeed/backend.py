"""``attach(engine, config)``: Excitation for a DeepSpeed engine with MoE layers:
native ``deepspeed.moe`` layers (ZeRO 0/1/2) or AutoEP layers (ZeRO 0-3, :mod:`.autoep`).

What it wires, and why there:

* counts: the core's router hook (:meth:`Excitation.hook_router`) on each routing
  module (``TopKGate``, or AutoEP's router), reading this rank's tokens per global
  expert from its output (:func:`compat.gate_counter`, :func:`autoep.router_counter`),
  accumulated over the micro-batches of one optimizer step;
* the single count all-reduce: issued by a forward hook on ``engine.module`` in
  the forward of the micro-batch at the gradient-accumulation boundary, so it
  overlaps that micro-batch's backward; reduced over the engine's (sequence-)
  data-parallel group, i.e. all expert-parallel x expert-data-parallel ranks;
* the update scaling: the core's step pre/post hooks on the BASE torch
  optimizer, on the slices of the fp32 tensors it steps (:mod:`.master_segments`).
  ZeRO steps the base optimizer once per parameter group, so the step is ended
  by a wrapper around ``engine.step`` (which also drops the counts of a step
  DeepSpeed skipped on fp16 overflow);
* the segment map is rebuilt after ``engine.load_checkpoint`` and whenever
  ZeRO / BF16_Optimizer re-link ``param._hp_mapping``;
* the controller's state travels in the checkpoint's ``client_state``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from excitation_dist.config import ExcitationConfig, as_config
from excitation_dist.core import Excitation, in_backward
from excitation_dist.deepspeed import compat
from excitation_dist.deepspeed.master_segments import owned_expert_segments

CLIENT_STATE_KEY = "excitation_dist"
_ATTACHMENT = "_excitation_attachment"


@dataclass
class _Attachment:
    excitation: Excitation
    layers: list[Any]
    handles: list[Any] = field(default_factory=list)
    patched: list[tuple[Any, str]] = field(default_factory=list)  # (object, attribute) replaced on the instance
    stale_segments: bool = False


def _check_engine(engine: Any) -> None:
    """Refuse native-MoE setups this backend cannot map (AutoEP: :func:`.autoep.check_engine`)."""
    if engine.zero_optimization_stage() == 3:
        raise NotImplementedError(
            "Excitation with ZeRO-3 needs AutoEP: DeepSpeed refuses native deepspeed.moe layers under ZeRO-3. "
            "Use expert_parallel.enabled with a Hugging Face MoE model, or zero_optimization.stage 0, 1 or 2."
        )


@dataclass(frozen=True)
class _MoEFamily:
    """How one family of DeepSpeed MoE layers exposes experts and routing."""

    layers: list[Any]
    num_experts: int
    expert_params: Callable[[Any], Any]  # layer -> [(param, [ExpertRange])]
    counter: Callable[[Any], Any]  # layer -> (routing module, output -> tokens per expert [E])


def _moe_family(engine: Any, config: ExcitationConfig) -> _MoEFamily:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        raise NotImplementedError("excitation_dist.deepspeed does not support DeepSpeed's PipelineEngine yet")
    if compat.autoep_layers(engine):
        from excitation_dist.deepspeed import autoep

        autoep.check_engine(engine)
        layers = compat.autoep_layers(engine)
        num_experts, expert_params, counter = autoep.num_global_experts, autoep.expert_params, autoep.router_counter
    else:
        _check_engine(engine)
        layers = compat.native_moe_layers(engine)
        if not layers:
            raise ValueError("attach() found no MoE layer in the engine: no deepspeed.moe layer (engine.moe_layers is "
                             "empty) and no AutoEP layer")
        num_experts, expert_params = compat.num_global_experts, compat.expert_params
        counter = lambda layer: compat.gate_counter(layer, config.counts, compat.num_global_experts(layer))  # noqa: E731
    experts = {num_experts(layer) for layer in layers}
    if len(experts) != 1:
        raise ValueError(f"all MoE layers must have the same number of experts, found {sorted(experts)}")
    return _MoEFamily(layers, experts.pop(), expert_params, counter)


def _patch(attachment: _Attachment, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(obj, name)
    setattr(obj, name, functools.wraps(original)(make(original)))
    attachment.patched.append((obj, name))


def attach(
    engine: Any,
    config: ExcitationConfig | Mapping[str, Any] | None = None,
    *,
    overlap: bool = True,
) -> Excitation:
    """Enable Excitation on every MoE layer of ``engine``.

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize``:
            ``deepspeed.moe`` layers with ZeRO stage 0, 1 or 2, or AutoEP layers
            with ZeRO 0-3; fp32, bf16 or fp16; any torch base optimizer.
        config: :class:`ExcitationConfig` or a mapping of its fields.
        overlap: issue the count all-reduce in the boundary micro-batch's
            forward (default); False leaves it to the optimizer step.

    Returns:
        The :class:`Excitation` controller (metrics, last counts and multipliers).
    """
    compat.check_version()
    if getattr(engine, _ATTACHMENT, None) is not None:
        raise RuntimeError("Excitation is already attached to this engine; call excitation_dist.deepspeed.detach(engine) first")
    compat.check_step_path(engine)
    excitation_config = as_config(config)
    family = _moe_family(engine, excitation_config)
    layers = family.layers

    group = getattr(engine, "seq_data_parallel_group", None) or engine.data_parallel_group
    excitation = Excitation(excitation_config, len(layers), family.num_experts, group, device=engine.device)
    attachment = _Attachment(excitation, layers)
    base = compat.base_optimizer(engine)

    def rebuild_segments() -> None:
        expert_params = [family.expert_params(layer) for layer in layers]
        excitation.set_segments(owned_expert_segments(expert_params, engine.optimizer, base))
        attachment.stale_segments = False

    rebuild_segments()

    # Registered before the core's hooks, so a stale map is rebuilt before the snapshot.
    def refresh(opt: Any, args: Any, kwargs: Any) -> None:
        if attachment.stale_segments:
            rebuild_segments()

    attachment.handles.append(base.register_step_pre_hook(refresh))
    excitation.hook_optimizer(base, end_step_after=False)
    for index, layer in enumerate(layers):
        router, tokens_per_expert = family.counter(layer)
        attachment.handles.append(excitation.hook_router(index, router, lambda a, k, out, f=tokens_per_expert: f(out)))

    if overlap:

        def reduce_after_boundary_forward(module: Any, args: Any, output: Any) -> None:
            training = module.training and torch.is_grad_enabled() and not in_backward()
            if training and engine.is_gradient_accumulation_boundary():
                excitation.reduce_counts_async()

        attachment.handles.append(engine.module.register_forward_hook(reduce_after_boundary_forward))

    def wrap_step(step: Callable) -> Callable:
        def step_with_excitation(*args: Any, **kwargs: Any) -> Any:
            steps_before = engine.global_steps
            result = step(*args, **kwargs)
            if engine.global_steps != steps_before:  # an optimizer step ran (or was skipped on overflow)
                excitation.finish_step(engine.was_step_applied())
            return result

        return step_with_excitation

    def wrap_save(save: Callable) -> Callable:
        def save_with_excitation(save_dir: Any, tag: Any = None, client_state: Mapping | None = None, *args: Any, **kwargs: Any) -> Any:
            state = dict(client_state or {})
            state[CLIENT_STATE_KEY] = excitation.state_dict()
            return save(save_dir, tag, state, *args, **kwargs)

        return save_with_excitation

    def wrap_load(load: Callable) -> Callable:
        def load_with_excitation(*args: Any, **kwargs: Any) -> Any:
            load_path, client_state = load(*args, **kwargs)
            if client_state and CLIENT_STATE_KEY in client_state:
                excitation.load_state_dict(client_state.pop(CLIENT_STATE_KEY))
            if load_path is not None:
                rebuild_segments()
            return load_path, client_state

        return load_with_excitation

    def wrap_relink(relink: Callable) -> Callable:
        def relink_and_mark(*args: Any, **kwargs: Any) -> Any:
            result = relink(*args, **kwargs)
            attachment.stale_segments = True
            return result

        return relink_and_mark

    _patch(attachment, engine, "step", wrap_step)
    _patch(attachment, engine, "save_checkpoint", wrap_save)
    _patch(attachment, engine, "load_checkpoint", wrap_load)
    if compat.relinks_hp_mapping(engine.optimizer):
        _patch(attachment, engine.optimizer, "_link_all_hp_params", wrap_relink)
    setattr(engine, _ATTACHMENT, attachment)
    return excitation


def detach(engine: Any) -> None:
    """Remove Excitation from ``engine``: hooks, and the wrapped engine methods."""
    attachment: _Attachment | None = getattr(engine, _ATTACHMENT, None)
    if attachment is None:
        return
    attachment.excitation.remove_hooks()
    for h in attachment.handles:
        h.remove()
    for obj, name in attachment.patched:
        delattr(obj, name)  # the instance attribute shadowed the class method
    setattr(engine, _ATTACHMENT, None)


def attached(engine: Any) -> Excitation | None:
    """The controller attached to ``engine``, if any."""
    attachment = getattr(engine, _ATTACHMENT, None)
    return None if attachment is None else attachment.excitation


__all__ = ["attach", "attached", "detach", "CLIENT_STATE_KEY"]

"""``attach(model_chunks, optimizer, config)``: Excitation for megatron-core MoE models.

What it wires, and why there:

* counts: the core's router hook (:meth:`Excitation.hook_router`) on every
  ``BaseMoELayer.router`` of every model chunk of this pipeline stage (virtual
  stages included), counting real assignments (:func:`compat.router_tokens_per_expert`),
  accumulated over the micro-batches of one optimizer step;
* a pipeline stage without MoE layers gets no controller (``attach`` returns
  None): nothing to count or scale, and no other stage's collective to join;
* the single count all-reduce: issued right after ``config.finalize_model_grads_func``
  (the end of megatron's forward-backward schedule, when every micro-batch and
  recompute has been counted), so it overlaps the optimizer's preamble; it is
  reduced over ``get_tensor_and_data_parallel_group(with_context_parallel=True)``
  of this stage. Without that function (or ``overlap=False``) the optimizer
  step issues it;
* the update scaling: the core's step pre/post hooks on the torch optimizer
  inside each of megatron's wrappers, on the slices of the fp32 main params
  that this rank steps (:mod:`.master_segments`). Megatron runs the torch step
  between unscale/clip and the main-to-model copy (and the DistributedOptimizer
  all-gather), so replicas stay identical with no extra communication;
* the step boundary: ``optimizer.step()`` is wrapped on the instance; a step
  megatron reports unsuccessful (``update_successful`` False: fp16 overflow)
  applies nothing and drops the counts (:meth:`Excitation.skip_step`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from excitation_dist.config import ExcitationConfig
from excitation_dist.core import Excitation
from excitation_dist.megatron import compat
from excitation_dist.megatron.master_segments import owned_expert_segments

_ATTACHMENT = "_excitation_attachment"
_WRAPPED = "_excitation_reduces_counts"


@dataclass
class _Attachment:
    excitation: Excitation
    layers: list[Any]
    model_chunks: list[Any]
    optimizer: Any
    overlap: bool
    handles: list[Any] = field(default_factory=list)
    model_config: Any = None
    original_finalize: Callable | None = None
    writes_common: bool = True  # this rank writes the checkpoint state every stage shares (one rank does)


def _as_chunks(model_chunks: Any) -> list[torch.nn.Module]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _wrap_finalize(attachment: _Attachment) -> None:
    """Issue the count all-reduce right after ``finalize_model_grads`` (idempotent;
    re-applied at each step because Megatron-LM's loop sets the function after
    building the optimizer)."""
    cfg = attachment.model_config
    finalize = getattr(cfg, "finalize_model_grads_func", None)
    if finalize is None or getattr(finalize, _WRAPPED, False):
        return
    excitation = attachment.excitation

    @functools.wraps(finalize)
    def finalize_then_reduce_counts(*args: Any, **kwargs: Any) -> Any:
        result = finalize(*args, **kwargs)
        excitation.reduce_counts_async()
        return result

    setattr(finalize_then_reduce_counts, _WRAPPED, True)
    attachment.original_finalize = finalize
    cfg.finalize_model_grads_func = finalize_then_reduce_counts


def attach(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    optimizer: Any,
    config: ExcitationConfig | Mapping[str, Any] | None = None,
    *,
    overlap: bool = True,
) -> Excitation | None:
    """Enable Excitation on every MoE layer of ``model_chunks``.

    Args:
        model_chunks: this rank's model chunks (DDP-wrapped, as returned by
            Megatron-LM's ``get_model``; a list with one entry per virtual
            pipeline stage), or one module.
        optimizer: what ``get_megatron_optimizer`` returned for them
            (ChainedOptimizer of FP32Optimizer / Float16OptimizerWithFloat16Params /
            DistributedOptimizer).
        config: :class:`ExcitationConfig` or a mapping of its fields.
        overlap: issue the count all-reduce right after ``finalize_model_grads``
            (default); False leaves it to the optimizer step.

    Returns:
        The :class:`Excitation` controller of this pipeline stage, or None on a
        stage that holds no MoE layer (dense first layers with ``moe_layer_freq``,
        e.g. DeepSeek-V3 style with an uneven split, ``--decoder-first-pipeline-num-layers``).
        Such a stage needs no count all-reduce: that collective runs over the
        stage's own group (``counts_process_group``: the DP x CP x TP ranks of
        this pipeline rank), whose ranks all hold the same dense layers, so no
        rank waits for it; and its updates are left as the optimizer made them.
        With pipeline parallelism, call it on every rank: it agrees once (one
        all-reduce) on the rank that writes the checkpoint state all stages share.
    """
    compat.check_version()
    chunks = _as_chunks(model_chunks)
    compat.check_supported(chunks, optimizer)
    if getattr(optimizer, _ATTACHMENT, None) is not None:
        raise RuntimeError("Excitation is already attached to this optimizer; call excitation_dist.megatron.detach(optimizer) first")
    layers = compat.moe_layers(chunks)
    first_with_layers = compat.first_rank_with_moe_layers(bool(layers))  # every rank, dense stages too
    if not layers:
        if compat.is_moe_model(chunks):
            return None  # a stage of dense layers only: nothing to count or scale, no collective to join
        raise ValueError("attach() found no MoE layer (BaseMoELayer) in the model: TransformerConfig.num_moe_experts "
                         "is not set; Excitation scales the updates of routed experts")
    experts = {compat.num_global_experts(layer) for layer in layers}
    if len(experts) != 1:
        raise ValueError(f"all MoE layers must have the same number of experts, found {sorted(experts)}")

    excitation = Excitation(config, len(layers), experts.pop(), compat.counts_process_group(),
                            device=layers[0].router.weight.device)
    if excitation.config.counts == "routed" and compat.capacity_drops(layers):
        raise NotImplementedError(
            "counts='routed' (before capacity dropping) is not available from megatron's router, whose routing_map "
            "is after dropping; use counts='processed' or drop moe_expert_capacity_factor"
        )
    excitation.set_segments(owned_expert_segments(layers, optimizer))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    attachment = _Attachment(excitation, layers, chunks, optimizer, overlap, model_config=compat.model_config(chunks),
                             writes_common=rank == first_with_layers)

    for leaf in compat.leaf_optimizers(optimizer):
        base = compat.base_optimizer(leaf)
        if base is not None:
            excitation.hook_optimizer(base, end_step_after=False)  # the chained step may step several
    attachment.handles += [excitation.hook_router(i, layer.router, compat.router_tokens_per_expert)
                           for i, layer in enumerate(layers)]
    if overlap:
        _wrap_finalize(attachment)

    step = optimizer.step

    @functools.wraps(step)
    def step_with_excitation(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        excitation.finish_step(compat.step_succeeded(result))
        if overlap:
            _wrap_finalize(attachment)
        return result

    optimizer.step = step_with_excitation
    setattr(optimizer, _ATTACHMENT, attachment)
    return excitation


def detach(optimizer: Any) -> None:
    """Remove Excitation: hooks, the wrapped ``step`` and ``finalize_model_grads_func``."""
    attachment: _Attachment | None = getattr(optimizer, _ATTACHMENT, None)
    if attachment is None:
        return
    attachment.excitation.remove_hooks()
    for h in attachment.handles:
        h.remove()
    del optimizer.step  # the instance attribute shadowed the class method
    cfg = attachment.model_config
    if attachment.original_finalize is not None and getattr(cfg.finalize_model_grads_func, _WRAPPED, False):
        cfg.finalize_model_grads_func = attachment.original_finalize
    setattr(optimizer, _ATTACHMENT, None)


def attached(optimizer: Any) -> Excitation | None:
    """The controller attached to ``optimizer``, if any."""
    attachment = getattr(optimizer, _ATTACHMENT, None)
    return None if attachment is None else attachment.excitation


def rebuild_segments(optimizer: Any) -> None:
    """Re-read the optimizer's main-parameter layout (after anything that
    re-creates the main params, e.g. re-building the optimizer's shards)."""
    attachment: _Attachment = getattr(optimizer, _ATTACHMENT)
    attachment.excitation.set_segments(owned_expert_segments(attachment.layers, optimizer))


__all__ = ["attach", "attached", "detach", "rebuild_segments"]

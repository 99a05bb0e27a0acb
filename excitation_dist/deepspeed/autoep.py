"""DeepSpeed AutoEP facts (``expert_parallel.enabled``): layers, experts, counts.

:func:`excitation_dist.deepspeed.attach` routes an engine with AutoEP layers
here for what differs from native ``deepspeed.moe`` layers; everything else
(one count all-reduce, blending, checkpoints) is shared.

AutoEP (DeepSpeed 0.19.x, ``deepspeed/module_inject/auto_ep*.py``) replaces the
MoE block of a Hugging Face model (presets: Mixtral, Qwen3-MoE/Qwen2-MoE,
Qwen3.5-MoE, DeepSeek-V2/V3, MiniMax-M3; transformers >= 5 with fused 3-D
expert weights) by an ``AutoEPMoELayer`` inside ``deepspeed.initialize``:

* ``layer.router`` is a ``TokenChoiceTopKRouter``; its forward returns
  ``(top_scores [T, K], selected_experts [T, K], num_tokens_per_expert [E])``,
  the last being this rank's assignments per GLOBAL expert before dispatch.
  AutoEP is dropless (no capacity), so these are also the assignments the
  experts process. A forward hook on the router counts them.
* ``layer.experts`` is a ``GroupedExperts`` with stacked weights ``w1``, ``w2``,
  ``w3`` of shape ``[num_local_experts, ...]``; local expert ``j`` is global
  expert ``first + j`` (uniform contiguous placement, see
  ``autoep_experts_for_rank``), ``first = ep_rank * num_local_experts``.
* Expert weights are partitioned over the expert-data-parallel group
  (``ds_zero_partition_process_group`` / ``group_name``), everything else over
  the data-parallel group.

Where the base optimizer's fp32 tensors hold the experts:

* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): the parameters of each sub-group
  are stepped as one flat fp32 tensor ``fp32_partitioned_groups_flat[i]`` that
  concatenates, in ``fp16_groups[i]`` order, each parameter's partition
  (``partition_numel()`` elements, the last rank's padded).
  ``grad_position[get_param_id(p)] = [i, offset, partition_numel]`` locates
  ``p``'s partition in it; the partition is elements
  ``[r * n, min((r + 1) * n, ds_numel))`` of the flattened parameter, ``r``
  being this rank in ``p.ds_process_group``. The base optimizer's param group
  holds that flat tensor only while ``_optimizer_step(i)`` runs.
* ZeRO-1/2, BF16_Optimizer, FP16 wrappers, plain fp32: as for native layers,
  but one parameter holds several experts (:mod:`.master_segments` handles all).

A partition may start or end inside an expert and holds several experts of a
stacked weight; :func:`excitation_dist.segments.stacked_expert_ranges` and
:func:`~excitation_dist.segments.owned_expert_ranges` cut it.

Not supported (refused): the PipelineEngine, AutoEP + AutoTP folding
(``tensor_parallel.autotp_size > 1``), ZeRO-3 NVMe optimizer swapping and
partial optimizer offload (``ratio < 1``, a second base optimizer).
"""

from __future__ import annotations

from typing import Any

import torch

from excitation_dist.segments import ExpertRange, stacked_expert_ranges


def num_global_experts(layer: Any) -> int:
    return int(layer.num_experts)


def first_local_expert(layer: Any) -> int:
    """Global index of this rank's local expert 0 (AutoEP's uniform contiguous placement)."""
    n_local = int(layer.num_local_experts)
    first = int(layer.ep_rank) * n_local
    descriptor = getattr(layer, "expert_placement_descriptor", None)
    if descriptor is not None:
        from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

        experts = [int(e) for e in autoep_experts_for_rank(descriptor, int(layer.ep_rank))]
        if not experts or experts != list(range(experts[0], experts[0] + n_local)):
            raise NotImplementedError(
                f"AutoEP placed experts {experts} on EP rank {layer.ep_rank}; excitation_dist supports only "
                "contiguous placement of num_local_experts experts per rank"
            )
        first = experts[0]
    return first


def expert_params(layer: Any) -> list[tuple[torch.nn.Parameter, list[ExpertRange]]]:
    """(parameter, expert ranges) for each stacked expert weight of an
    ``AutoEPMoELayer`` (``w1``, ``w2``, ``w3`` of ``GroupedExperts``, ``[E_local, ...]``)."""
    n_local = int(layer.num_local_experts)
    first = first_local_expert(layer)
    out = []
    for name, p in layer.experts.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if not shape or shape[0] != n_local:
            raise RuntimeError(
                f"AutoEP expert weight '{name}' has shape {shape}, expected [{n_local}, ...] (stacked local experts); "
                "DeepSpeed changed GroupedExperts (see excitation_dist/deepspeed/autoep.py)"
            )
        numel = int(getattr(p, "ds_numel", p.numel()))
        out.append((p, stacked_expert_ranges(numel, n_local, first_expert=first)))
    return out


def router_counts(output: Any) -> torch.Tensor:
    """This rank's tokens per global expert from a ``TokenChoiceTopKRouter``
    output ``(top_scores, selected_experts, num_tokens_per_expert)``; AutoEP is
    dropless, so routed = processed."""
    if not isinstance(output, (tuple, list)) or len(output) != 3:
        raise RuntimeError("unexpected TokenChoiceTopKRouter output; DeepSpeed changed its AutoEP router API")
    return output[2].detach().to(torch.int64)


def router_counter(layer: Any) -> tuple[torch.nn.Module, Any]:
    return layer.router, router_counts


def check_engine(engine: Any) -> None:
    """Refuse AutoEP setups whose optimizer tensors this backend cannot map."""
    from excitation_dist.deepspeed import compat

    if compat.native_moe_layers(engine):
        raise NotImplementedError("an engine with both deepspeed.moe layers and AutoEP layers is not supported")
    spec = getattr(engine, "_autoep_folding_spec", None)
    if spec is not None and getattr(spec, "tp_size", 1) > 1:
        raise NotImplementedError("Excitation with AutoEP + AutoTP folding (tensor_parallel.autotp_size > 1) is not supported yet")
    opt = engine.optimizer
    if getattr(opt, "swap_optimizer", False):
        raise NotImplementedError("Excitation with ZeRO-3 NVMe optimizer swapping is not supported")
    if getattr(opt, "offload_optimizer", False) and float(getattr(opt, "partial_offload", 1.0)) < 1.0:
        raise NotImplementedError("Excitation with ZeRO-3 partial optimizer offload (ratio < 1) is not supported")

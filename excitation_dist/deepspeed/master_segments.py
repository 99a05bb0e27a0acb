"""Which elements of the tensors the base optimizer steps belong to which expert.

DeepSpeed steps fp32 tensors that are not the model's parameters:

* ZeRO-1/2 and ``BF16_Optimizer``: one flat fp32 partition per parameter group
  per rank; ``param._hp_mapping`` names the piece of ``param`` this rank owns
  (``lp_fragment_address``: start and length inside the flattened parameter)
  and where it lies in the partition (``hp_fragment_address``). The piece can
  start or end anywhere inside the parameter; ``_hp_mapping is None`` when this
  rank owns none of it.
* fp16/bf16 without ZeRO: fp32 master copies kept by the FP16 wrappers.
* fp32 without ZeRO: the parameters themselves.

Each expert parameter of ``deepspeed.moe`` belongs to one global expert, so
its expert range is the whole parameter; :func:`owned_expert_ranges` cuts it to
what this rank steps.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from excitation_dist.core import ExpertSegment
from excitation_dist.deepspeed import compat
from excitation_dist.segments import owned_expert_ranges, stacked_expert_ranges


def _by_storage(tensors: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    return {t.untyped_storage().data_ptr(): t for t in tensors}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def owned_expert_segments(
    expert_params_by_layer: list[list[tuple[int, torch.nn.Parameter]]],
    wrapper: Any,
    base: torch.optim.Optimizer,
) -> list[ExpertSegment]:
    """Segments of the base optimizer's tensors that this rank steps, for every
    (global expert, parameter) of every MoE layer (index = Excitation layer).

    Args:
        expert_params_by_layer: per MoE layer, this rank's (global expert, param).
        wrapper: ``engine.optimizer`` (ZeRO, BF16_Optimizer, FP16 wrapper, or the base).
        base: the torch optimizer it wraps (``engine.basic_optimizer``).
    """
    stepped = _optimizer_tensors(base)
    stepped_ids = {id(t) for t in stepped}
    storages = _by_storage(stepped)
    masters = {id(lp): (hp, offset) for lp, hp, offset in (compat.wrapper_master_copies(wrapper) or [])}

    segments = []
    for layer, params in enumerate(expert_params_by_layer):
        for expert, p in params:
            whole = stacked_expert_ranges(p.numel(), 1, first_expert=expert)
            if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer
                frag = p._hp_mapping
                if frag is None:
                    continue  # another rank of the (expert-)data-parallel group steps it
                lp_start, numel = frag.lp_fragment_address.start, frag.lp_fragment_address.numel
                hp_start = frag.get_hp_fragment_address().start
                tensor = storages.get(frag.hp_fragment.untyped_storage().data_ptr())
                if tensor is None or frag.hp_fragment.storage_offset() != tensor.storage_offset() + hp_start:
                    raise RuntimeError(
                        f"MoE layer {layer}, expert {expert}: the fp32 partition behind param._hp_mapping is not a "
                        "tensor of the base optimizer; DeepSpeed's partition layout changed (see compat.py)"
                    )
                ranges = owned_expert_ranges(whole, lp_start, lp_start + numel, offset=hp_start)
            elif id(p) in masters:  # FP16_Optimizer / FP16_UnfusedOptimizer
                tensor, offset = masters[id(p)]
                ranges = owned_expert_ranges(whole, 0, p.numel(), offset=offset)
            elif id(p) in stepped_ids:  # fp32, no ZeRO
                tensor, ranges = p, whole
            elif not p.requires_grad:
                continue
            else:
                raise ValueError(
                    f"MoE layer {layer}, expert {expert}: a trainable expert parameter is stepped by no tensor of the "
                    f"base optimizer ({type(base).__name__} wrapped in {type(wrapper).__name__}); pass all expert "
                    "parameters to deepspeed.initialize"
                )
            segments += [ExpertSegment(tensor, r.start, r.end, layer, r.expert) for r in ranges]
    return segments

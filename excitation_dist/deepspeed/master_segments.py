"""Which elements of the tensors the base optimizer steps belong to which expert.

DeepSpeed steps fp32 tensors that are not the model's parameters:

* ZeRO-3: per sub-group one flat fp32 tensor ``fp32_partitioned_groups_flat[i]``
  that concatenates each parameter's partition (``partition_numel()`` elements,
  the last rank's padded); ``grad_position[param_id] = [i, offset, numel]``
  locates it, and partition rank ``r`` owns elements ``[r * numel, (r + 1) * numel)``
  of the flattened parameter (clipped to ``ds_numel``).
* ZeRO-1/2 and ``BF16_Optimizer``: one flat fp32 partition per parameter group
  per rank; ``param._hp_mapping`` names the piece of ``param`` this rank owns
  (``lp_fragment_address``: start and length inside the flattened parameter)
  and where it lies in the partition (``hp_fragment_address``). The piece can
  start or end anywhere inside the parameter; ``_hp_mapping is None`` when this
  rank owns none of it.
* fp16/bf16 without ZeRO: fp32 master copies kept by the FP16 wrappers.
* fp32 without ZeRO: the parameters themselves.

Callers say which elements of each expert parameter belong to which global
expert (a whole ``deepspeed.moe`` expert parameter, or one chunk of an AutoEP
stacked weight); this module says where each parameter is stepped
(:func:`stepped_pieces`), and the core's scaffold (:mod:`excitation_dist.shards`)
cuts the expert ranges to it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from excitation_dist.core import ExpertSegment
from excitation_dist.deepspeed import compat
from excitation_dist.shards import ExpertParams, SteppedPiece, expert_segments


def is_zero3(wrapper: Any) -> bool:
    return hasattr(wrapper, "fp32_partitioned_groups_flat") and hasattr(wrapper, "grad_position")


def zero3_piece(optimizer: Any, p: torch.nn.Parameter) -> SteppedPiece:
    """ZeRO-3: this rank's partition of ``p`` inside the flat fp32 tensor of its sub-group."""
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(p)]
    flat = optimizer.fp32_partitioned_groups_flat[group]
    if flat.numel() < offset + numel:
        raise NotImplementedError(
            "the ZeRO-3 fp32 partition is not resident (NVMe optimizer swapping); excitation_dist does not support it"
        )
    start = optimizer._get_param_partition_rank(p) * numel
    end = min(start + numel, int(p.ds_numel))
    return SteppedPiece(p, flat, start, max(start, end), int(offset))


def stepped_pieces(params: Sequence[torch.nn.Parameter], wrapper: Any, base: torch.optim.Optimizer) -> list[SteppedPiece]:
    """Where the base optimizer steps each of ``params`` on this rank (nothing for
    a parameter another rank of its (expert-)data-parallel group steps)."""
    zero3 = is_zero3(wrapper)
    stepped = [t for group in base.param_groups for t in group["params"]]
    stepped_ids = {id(t) for t in stepped}
    storages = {t.untyped_storage().data_ptr(): t for t in stepped}
    masters = {id(lp): (hp, offset) for lp, hp, offset in (compat.wrapper_master_copies(wrapper) or [])}
    pieces = []
    for p in params:
        if not p.requires_grad:
            continue
        numel = int(getattr(p, "ds_numel", p.numel()))
        if zero3:
            if not hasattr(p, "ds_id"):
                raise RuntimeError("ZeRO-3 optimizer but an expert weight is not a ZeRO-3 parameter")
            pieces.append(zero3_piece(wrapper, p))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer
            frag = p._hp_mapping
            if frag is None:
                continue  # another rank of the (expert-)data-parallel group steps it
            lp_start, n = frag.lp_fragment_address.start, frag.lp_fragment_address.numel
            hp_start = frag.get_hp_fragment_address().start
            tensor = storages.get(frag.hp_fragment.untyped_storage().data_ptr())
            if tensor is None or frag.hp_fragment.storage_offset() != tensor.storage_offset() + hp_start:
                raise RuntimeError(
                    "the fp32 partition behind param._hp_mapping is not a tensor of the base optimizer; "
                    "DeepSpeed's partition layout changed (see compat.py)"
                )
            pieces.append(SteppedPiece(p, tensor, lp_start, lp_start + n, hp_start))
        elif id(p) in masters:  # FP16_Optimizer / FP16_UnfusedOptimizer
            hp, offset = masters[id(p)]
            pieces.append(SteppedPiece(p, hp, 0, numel, offset))
        elif id(p) in stepped_ids:  # fp32, no ZeRO
            pieces.append(SteppedPiece(p, p, 0, numel))
        else:
            raise ValueError(
                f"a trainable expert parameter is stepped by no tensor of the base optimizer ({type(base).__name__} "
                f"wrapped in {type(wrapper).__name__}); pass all expert parameters to deepspeed.initialize"
            )
    return pieces


def owned_expert_segments(
    expert_params_by_layer: Sequence[ExpertParams],
    wrapper: Any,
    base: torch.optim.Optimizer,
) -> list[ExpertSegment]:
    """Segments of the base optimizer's tensors that this rank steps, for every
    expert parameter of every MoE layer (list index = Excitation layer).

    Args:
        expert_params_by_layer: per MoE layer, this rank's (parameter, expert ranges).
        wrapper: ``engine.optimizer`` (ZeRO, BF16_Optimizer, FP16 wrapper, or the base).
        base: the torch optimizer it wraps (``engine.basic_optimizer``).
    """
    params = [p for layer in expert_params_by_layer for p, _ in layer]
    return expert_segments(expert_params_by_layer, stepped_pieces(params, wrapper, base), every_param_stepped=False)

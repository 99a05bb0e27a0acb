"""Every DeepSpeed-specific fact this backend relies on, in one place.

Checked against DeepSpeed 0.19.x (0.19.8): the facts below are read from its
``moe/sharded_moe.py``, ``moe/experts.py``, ``utils/tensor_fragment.py``,
``utils/mixed_precision_linkage.py``, ``runtime/zero/stage_1_and_2.py``,
``runtime/bf16_optimizer.py``, ``runtime/fp16/*_optimizer.py`` and
``runtime/engine.py``. Outside that range :func:`check_version` refuses to run,
because a silent change in any of them (the gate's output layout, the fp32
partition layout) would make Excitation scale the wrong elements.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

from excitation_dist import versions
from excitation_dist.counting import tokens_per_expert
from excitation_dist.segments import ExpertRange, stacked_expert_ranges

CHECKED_RANGE = versions.GATES["deepspeed"].specifier


def check_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed version outside the range this backend was checked against."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    versions.check("deepspeed", version)


def init_distributed() -> bool:
    """``deepspeed.init_distributed`` for this machine: NCCL on GPUs; without one,
    DeepSpeed's CPU accelerator over gloo, one thread per rank unless
    OMP_NUM_THREADS says otherwise, and no shared-memory op build. Returns
    True on CPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_cpu_shm_comm_build()
        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    return on_cpu


def skip_cpu_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU backend from compiling its shared-memory all-reduce op
    (100-160 s on first use; it only serves inference all-reduce). Call before
    ``deepspeed.init_distributed`` / ``deepspeed.initialize``. The package
    attribute ``deepspeed.comm.torch`` is the torch module, hence sys.modules."""
    import deepspeed.comm.torch  # noqa: F401  (registers the module)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# ------------------------------------------------------------------ gates
def gate_processed_counts(gate_output: Sequence[Any], num_experts: int) -> torch.Tensor:
    """Tokens per global expert that the experts will compute (capacity-dropped
    assignments excluded) from one ``TopKGate.forward`` output. int64 ``[E]``.

    ``MOELayer`` calls the gate with ``sparse_routes=True``: the output is
    ``(l_aux, capacity, E, indices_KS, locations_KS, gates_KS, exp_counts_E)``
    with ``indices = -1`` for dropped routes (and, for top-1, unused tokens).
    A direct call without sparse routes gives ``(l_aux, combine_SEC,
    dispatch_mask_SEC, exp_counts_E)``.
    """
    if len(gate_output) == 7:
        return tokens_per_expert(gate_output[3].t(), num_experts)
    if len(gate_output) == 4:
        return gate_output[2].any(-1).sum(0).to(torch.int64)
    raise RuntimeError(f"unexpected TopKGate output of {len(gate_output)} items; DeepSpeed changed its gate API")


def gate_routed_counts(gate_output: Sequence[Any]) -> torch.Tensor:
    """Router assignments per global expert before capacity dropping (the gate's
    own ``exp_counts``, the third item ``MoE.forward`` returns). int64 ``[E]``."""
    return gate_output[-1].detach().to(torch.int64)


# ----------------------------------------------------------------- layers
def native_moe_layers(engine: Any) -> list[Any]:
    """The ``deepspeed.moe`` ``MOELayer`` modules, in module order."""
    return list(getattr(engine, "moe_layers", []))


def autoep_layers(engine: Any) -> list[Any]:
    """DeepSpeed AutoEP's ``AutoEPMoELayer`` modules (see :mod:`.autoep`), in module order."""
    try:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    except ImportError:
        return []
    return [m for m in engine.module.modules() if isinstance(m, AutoEPMoELayer)]


def expert_params(layer: Any) -> list[tuple[torch.nn.Parameter, list[ExpertRange]]]:
    """(parameter, expert ranges) for every parameter of this rank's experts:
    each ``deepspeed.moe`` expert parameter belongs whole to one global expert.

    ``Experts`` holds ``num_local_experts`` deep copies of the expert module;
    the all-to-all sends expert chunk ``e`` of ``[E, C, M]`` to EP rank
    ``e // num_local_experts``, so local expert ``j`` on EP rank ``r`` is global
    expert ``r * num_local_experts + j``.
    """
    import torch.distributed as dist

    if layer.ep_group is None:
        raise RuntimeError("this MoE layer has no expert-parallel group; attach() after deepspeed.initialize()")
    ep_rank = dist.get_rank(group=layer.ep_group)
    out = []
    for j, expert in enumerate(layer.experts.deepspeed_experts):
        for p in expert.parameters():
            out.append((p, stacked_expert_ranges(p.numel(), 1, first_expert=ep_rank * layer.num_local_experts + j)))
    return out


def gate_counter(layer: Any, counts: str, num_experts: int) -> tuple[torch.nn.Module, Any]:
    """(the layer's ``TopKGate``, output -> tokens per global expert) for
    ``counts`` = "processed" (after capacity dropping) or "routed"."""
    if counts == "routed":
        return layer.gate, gate_routed_counts
    return layer.gate, lambda output: gate_processed_counts(output, num_experts)


def num_global_experts(layer: Any) -> int:
    return int(layer.gate.wg.out_features)


# --------------------------------------------------- optimizer wrappers
def check_step_path(engine: Any) -> None:
    """Refuse engines whose optimizer step bypasses the base torch optimizer's
    ``step`` (where Excitation scales the update): ZenFlow's selective optimizer
    updates the important columns itself and defers the rest to a CPU thread."""
    if getattr(engine, "zenflow", False):
        raise NotImplementedError(
            "Excitation does not support DeepSpeed ZenFlow (zero_optimization.zenflow): its selective update "
            "bypasses the base optimizer's step, so no expert update would be scaled. Remove the zenflow "
            "section (plain ZeRO-Offload, offload_optimizer, is supported)."
        )



def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed wraps (ZeRO, BF16_Optimizer, FP16 wrappers)."""
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, torch.optim.Optimizer):
        raise RuntimeError("the DeepSpeed engine has no torch base optimizer; pass an optimizer to deepspeed.initialize")
    return opt


def relinks_hp_mapping(optimizer: Any) -> bool:
    """ZeRO-1/2 and BF16_Optimizer re-create ``param._hp_mapping`` in
    ``_link_all_hp_params`` (checkpoint load, offload/reload of states)."""
    return callable(getattr(optimizer, "_link_all_hp_params", None))


def wrapper_master_copies(optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]] | None:
    """(low-precision param, fp32 master tensor, offset of the param in it) for the
    non-ZeRO fp16/bf16 wrappers: ``FP16_UnfusedOptimizer`` keeps one fp32 copy per
    param (``fp32_groups``); ``FP16_Optimizer`` one flat fp32 tensor per group
    (``fp32_groups_flat``) in ``fp16_groups`` order. None for other optimizers."""
    lp_groups = getattr(optimizer, "fp16_groups", None)
    if lp_groups is None:
        return None
    out = []
    if hasattr(optimizer, "fp32_groups_flat"):
        for lp_group, flat in zip(lp_groups, optimizer.fp32_groups_flat):
            offset = 0
            for lp in lp_group:
                out.append((lp, flat, offset))
                offset += lp.numel()
        return out
    if hasattr(optimizer, "fp32_groups"):
        for lp_group, hp_group in zip(lp_groups, optimizer.fp32_groups):
            out += [(lp, hp, 0) for lp, hp in zip(lp_group, hp_group)]
        return out
    return None

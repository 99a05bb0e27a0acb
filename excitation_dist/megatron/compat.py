"""Every megatron-core fact this backend relies on, in one place.

Checked against megatron-core 0.16.1 and 0.19.2 (versions in between lie
inside the range and share these facts; nothing else was checked). Read from
``transformer/moe/{moe_layer,router,experts}.py``, ``optimizer/{__init__,
optimizer,distrib_optimizer,optimizer_config}.py``,
``distributed/distributed_data_parallel_config.py`` and ``parallel_state.py``.
Outside that range :func:`check_version` refuses to run: a silent change in the
router's output or the optimizers' main-parameter layout would make Excitation
count or scale the wrong elements.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from excitation_dist import versions
from excitation_dist.segments import ExpertRange, stacked_expert_ranges
from excitation_dist.shards import SteppedPiece

CHECKED_RANGE = versions.GATES["megatron-core"].specifier


def installed_version() -> str:
    return versions.installed("megatron-core")


def check_version(version: str | None = None) -> None:
    """Refuse a megatron-core version outside the range this backend was checked against."""
    versions.check("megatron-core", version)


def has_training_loop() -> bool:
    """Only megatron-core 0.19.x ships ``megatron.training`` (Megatron-LM's loop)."""
    import importlib.util

    return importlib.util.find_spec("megatron.training") is not None


# ------------------------------------------------------------ unsupported
def check_supported(model_chunks: Sequence[torch.nn.Module], optimizer: Any) -> None:
    """Raise for the setups whose optimizer step bypasses the fp32 main
    parameters the base torch optimizer steps (the place Excitation scales)."""
    opt_config = getattr(optimizer, "config", None)

    def flag(name: str) -> Any:
        return getattr(opt_config, name, None)

    refusals = [
        (flag("use_precision_aware_optimizer"), "OptimizerConfig.use_precision_aware_optimizer (--use-precision-aware-optimizer)",
         "TE's FusedAdam keeps the main parameters inside the fused kernel; turn it off"),
        (flag("optimizer_cpu_offload"), "OptimizerConfig.optimizer_cpu_offload (--optimizer-cpu-offload)",
         "HybridDeviceOptimizer steps CPU copies outside the wrapped torch optimizer; turn it off"),
        (flag("use_layer_wise_optimizer"), "OptimizerConfig.use_layer_wise_optimizer",
         "the layer-wise (Muon) optimizer is not wired up; use adam or sgd"),
        (flag("optimizer_cuda_graph"), "CUDA graphs for the optimizer step (--optimizer-cuda-graph, "
         "OptimizerConfig.optimizer_cuda_graph)",
         "Megatron-LM captures optimizer.step() once and then replays the graph, which skips the Python step "
         "wrapper and the torch optimizer hooks where Excitation reduces its counts and scales the expert "
         "updates; drop --optimizer-cuda-graph"),
    ]
    for chunk in model_chunks:
        ddp = getattr(chunk, "ddp_config", None)
        refusals.append((getattr(ddp, "use_megatron_fsdp", False), "DistributedDataParallelConfig.use_megatron_fsdp (--use-megatron-fsdp)",
                         "megatron-FSDP shards parameters outside the DistributedOptimizer's main shards; use the DistributedOptimizer"))
        refusals.append((getattr(ddp, "use_custom_fsdp", False), "DistributedDataParallelConfig.use_custom_fsdp",
                         "custom FSDP is not supported; use the DistributedOptimizer"))
        cfg = getattr(chunk, "config", None)
        refusals.append((getattr(cfg, "moe_latent_size", None), "TransformerConfig.moe_latent_size",
                         "MoE latent projections are not supported yet"))
        graphs = _cuda_graph_setting(cfg)
        refusals.append((graphs is not None, f"CUDA graphs ({graphs})",
                         "a captured graph replays the router without its Python forward hooks, so no token would be "
                         "counted; turn CUDA graphs off (cuda_graph_impl='none', no --enable-cuda-graph / "
                         "--external-cuda-graph)"))
        refusals.append((getattr(cfg, "moe_expert_rank_capacity_factor", None) is not None,
                         "TransformerConfig.moe_expert_rank_capacity_factor",
                         "the flex dispatcher drops tokens after the router, where Excitation counts; use "
                         "moe_expert_capacity_factor (dropped at the router) instead"))
        tp, ep = getattr(cfg, "tensor_model_parallel_size", 1), getattr(cfg, "expert_model_parallel_size", 1)
        etp = getattr(cfg, "expert_tensor_parallel_size", None) or tp
        refusals.append((tp > 1 and ep == 1 and etp != tp,
                         f"expert_tensor_parallel_size={etp} with tensor_model_parallel_size={tp} and expert_model_parallel_size=1",
                         "megatron-core marks expert params allreduce = (EP > 1), so their gradients are reduced over "
                         "data parallel only and the TP ranks' expert copies diverge; use expert_model_parallel_size > 1 "
                         "or expert_tensor_parallel_size = tensor_model_parallel_size"))
    for on, setting, advice in refusals:
        if on:
            raise NotImplementedError(f"Excitation does not support {setting}: {advice}.")
    for leaf in leaf_optimizers(optimizer):
        kind = type(leaf).__name__
        if kind not in ("FP32Optimizer", "Float16OptimizerWithFloat16Params", "DistributedOptimizer"):
            raise NotImplementedError(
                f"Excitation supports megatron's FP32Optimizer, Float16OptimizerWithFloat16Params and "
                f"DistributedOptimizer (inside a ChainedOptimizer); got {kind}"
            )
        base = getattr(leaf, "optimizer", None)
        if base is not None and not isinstance(base, torch.optim.Optimizer):
            raise NotImplementedError(
                f"{kind} wraps {type(base).__name__}, not a torch.optim.Optimizer (CPU offload?); "
                "Excitation hooks the torch optimizer's step"
            )


def _cuda_graph_setting(cfg: Any) -> str | None:
    """The TransformerConfig fields that turn CUDA graphs on (0.16: ``enable_cuda_graph``,
    ``external_cuda_graph``, ``cuda_graph_impl``; 0.19 also ``full_iteration``), or None."""
    on = [name for name in ("enable_cuda_graph", "external_cuda_graph") if getattr(cfg, name, False)]
    impl = getattr(cfg, "cuda_graph_impl", "none")
    if impl not in (None, "none"):
        on.append(f"cuda_graph_impl={impl!r}")
    return ", ".join(on) or None


# ------------------------------------------------------------------ layers
def moe_layers(model_chunks: Sequence[torch.nn.Module]) -> list[Any]:
    """Every MoE layer (``BaseMoELayer``) of this pipeline stage, model chunk by
    model chunk (virtual pipeline stages in order), in module order."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, BaseMoELayer)]


def is_moe_model(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """True if the model has routed experts (``num_moe_experts``), even where this
    pipeline stage holds only dense layers (``moe_layer_freq``: dense first layers)."""
    return bool(getattr(model_config(model_chunks), "num_moe_experts", None))


def num_global_experts(layer: Any) -> int:
    return int(layer.config.num_moe_experts)


def local_expert_ranges(layer: Any) -> list[tuple[torch.nn.Parameter, list[ExpertRange]]]:
    """(parameter, expert ranges in its flattened coordinates) for every parameter
    of this rank's routed experts. ``layer.local_expert_indices[i]`` is the
    global expert of local expert ``i``.

    * ``SequentialMLP``: ``local_experts[i]`` is a full MLP; each of its params is one expert.
    * ``TEGroupedMLP``: ``linear_fc1``/``linear_fc2`` hold ``weight{i}`` (and ``bias{i}``) per local expert,
      or, with ``moe_single_grouped_weight`` / ``moe_single_grouped_bias`` (0.19.x, Transformer Engine
      >= 2.14), one ``weight`` / ``bias`` stacking all ``num_gemms`` local experts on the leading
      dimension: expert ``i`` is flat chunk ``i`` (what ``TEGroupedLinear._split_grouped_checkpoint_tensor``
      cuts for the checkpoint's ``weight{i}``).
    * legacy ``GroupedMLP``: one ``weight1``/``weight2`` for all local experts, viewed as
      ``[E_local, ...]`` in its forward, so expert ``i`` is flat chunk ``i``.

    Shared experts (``layer.shared_experts``) and the router are not experts here.
    """
    experts = layer.experts
    kind = type(experts).__name__
    globals_ = list(layer.local_expert_indices)
    out: list[tuple[torch.nn.Parameter, list[ExpertRange]]] = []
    if kind == "SequentialMLP":
        for i, expert in enumerate(experts.local_experts):
            for p in expert.parameters():
                out.append((p, stacked_expert_ranges(p.numel(), 1, first_expert=globals_[i])))
    elif kind == "TEGroupedMLP":
        for linear in (experts.linear_fc1, experts.linear_fc2):
            for name, p in linear.named_parameters(recurse=False):
                match = re.fullmatch(r"(?:weight|bias)(\d*)", name)
                if match is None:
                    raise RuntimeError(f"unexpected TEGroupedMLP parameter {name!r}; megatron changed its layout")
                if match.group(1):  # one expert: weight{i} / bias{i}
                    out.append((p, stacked_expert_ranges(p.numel(), 1, first_expert=globals_[int(match.group(1))])))
                    continue
                stacked = int(linear.num_gemms)  # single grouped weight / bias: [num_gemms, ...]
                if stacked != len(globals_) or p.numel() % stacked:
                    raise RuntimeError(f"TEGroupedMLP single grouped {name!r} of {p.numel()} elements does not stack "
                                       f"{len(globals_)} local experts ({stacked} GEMMs); megatron changed its layout")
                out.append((p, stacked_expert_ranges(p.numel(), stacked, first_expert=globals_[0])))
    elif kind == "GroupedMLP":
        for p in (experts.weight1, experts.weight2):
            out.append((p, stacked_expert_ranges(p.numel(), experts.num_local_experts, first_expert=globals_[0])))
    else:
        raise NotImplementedError(
            f"Excitation knows SequentialMLP, TEGroupedMLP and GroupedMLP experts; this MoE layer has {kind}"
        )
    return out


# ------------------------------------------------------------------ counts
def router_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``TopKRouter.forward`` returns ``(probs, routing_map)``, both ``[tokens, E]``:
    ``routing_map`` bool after top-k and capacity handling, ``probs`` the routing
    weights, zero off the kept routes. With ``moe_pad_expert_input_to_capacity``
    megatron returns the *capacity mask* as ``routing_map`` (every expert shows
    ``capacity`` tokens, real or padding) and zeroes ``probs`` on the padding slots
    (``moe_utils.apply_router_token_dropping``)."""
    if not (isinstance(output, tuple) and len(output) == 2 and output[1].dtype == torch.bool
            and output[0].shape == output[1].shape):
        raise RuntimeError("unexpected router output; megatron-core changed TopKRouter.forward (see compat.py)")
    return output[0], output[1]


def router_padding_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The router's ``padding_mask`` argument (``MoELayer.route`` passes it second).

    Shape ``[seq, batch]`` like the router input; True marks PADDING: the router
    keeps ``~padding_mask`` tokens for its z-loss and aux-loss (its docstring says
    the opposite; the code is what counts).
    """
    mask = kwargs.get("padding_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    return mask


def routed_tokens_per_expert(
    probs: torch.Tensor, routing_map: torch.Tensor, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """int64 ``[E]``: this rank's real (token, expert) assignments: routes in the
    map with a nonzero probability (capacity padding has probability 0), padding
    tokens excluded. A kept route's probability is a top-k softmax / sigmoid
    score, never exactly 0 in practice."""
    real_TE = routing_map & (probs != 0)
    if padding_mask is not None:
        keep = ~padding_mask.reshape(-1).to(torch.bool)
        if keep.shape[0] != real_TE.shape[0]:
            raise ValueError(f"padding mask of {keep.shape[0]} tokens for a routing map of {real_TE.shape[0]}")
        real_TE = real_TE & keep.unsqueeze(-1)
    return real_TE.sum(dim=0, dtype=torch.int64)


def router_tokens_per_expert(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    """This rank's real (token, expert) assignments from one ``TopKRouter.forward``:
    routes of the ``routing_map`` with a nonzero probability, padding tokens
    excluded. Right on every capacity setting: without a capacity factor, with
    token dropping (dropped routes leave both the map and the probabilities), and
    with ``moe_pad_expert_input_to_capacity``, where the map is the capacity mask
    and the padded slots have probability 0. Megatron's activation recompute runs
    the original forward under ``no_grad`` and the recompute in backward: the
    core's guard counts it once, in backward."""
    probs, routing_map = router_output(output)
    return routed_tokens_per_expert(probs, routing_map, router_padding_mask(args, kwargs))


def counts_process_group() -> Any:
    """The ranks holding distinct tokens for this pipeline stage's layers:
    data x context x tensor parallel (MoE with TP requires sequence parallelism,
    so TP ranks route distinct tokens)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def first_rank_with_moe_layers(has_moe_layers: bool) -> int:
    """The lowest global rank whose pipeline stage holds MoE layers (it writes the
    state every stage shares into checkpoints): global rank 0 may sit on a stage of
    dense layers only. Without pipeline parallelism every rank does: 0, no
    communication; with it, one MIN all-reduce over the world, so every rank calls this."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_pipeline_model_parallel_world_size() > 1):
        return 0
    from excitation_dist.core import collective_device

    rank = torch.tensor([dist.get_rank() if has_moe_layers else dist.get_world_size()], device=collective_device(None))
    dist.all_reduce(rank, op=dist.ReduceOp.MIN)
    return int(rank)


def capacity_drops(layers: Iterable[Any]) -> bool:
    return any(getattr(layer.config, "moe_expert_capacity_factor", None) is not None for layer in layers)


# --------------------------------------------------------------- optimizers
def leaf_optimizers(optimizer: Any) -> list[Any]:
    """The megatron optimizers inside (possibly nested) ChainedOptimizers."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        return [optimizer]
    return [leaf for inner in chained for leaf in leaf_optimizers(inner)]


def base_optimizer(leaf: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer a megatron wrapper steps (None for a stub: no params here)."""
    if getattr(leaf, "is_stub_optimizer", False):
        return None
    return getattr(leaf, "optimizer", None)


def stepped_pieces(leaf: Any) -> list[SteppedPiece]:
    """What ``leaf``'s base optimizer steps on this rank, per model parameter.

    * FP32Optimizer: the model parameters themselves.
    * Float16OptimizerWithFloat16Params: a full fp32 copy per bf16/fp16 param
      (``float16_groups`` <-> ``fp32_from_float16_groups``), fp32 params themselves.
    * DistributedOptimizer: the fp32 main shard of each param this rank owns:
      ``model_float16_groups`` <-> ``shard_fp32_from_float16_groups`` (clones) and
      ``model_fp32_groups`` <-> ``shard_fp32_groups`` (views of the param buffer);
      the owned range of the flattened param is ``_get_model_param_range_map(p)["param"]``
      and can cut through an expert.
    """
    kind = type(leaf).__name__
    if base_optimizer(leaf) is None:
        return []
    if kind == "FP32Optimizer":
        return [SteppedPiece(p, p, 0, p.numel()) for g in leaf.optimizer.param_groups for p in g["params"]]
    if kind == "Float16OptimizerWithFloat16Params":
        out = []
        for lp_group, main_group in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
            out += [SteppedPiece(lp, main, 0, lp.numel()) for lp, main in zip(lp_group, main_group)]
        for group in leaf.fp32_from_fp32_groups:
            out += [SteppedPiece(p, p, 0, p.numel()) for p in group]
        return out
    if kind == "DistributedOptimizer":
        out = []
        pairs = [(leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups),
                 (leaf.model_fp32_groups, leaf.shard_fp32_groups)]
        for model_groups, shard_groups in pairs:
            for model_group, shard_group in zip(model_groups, shard_groups):
                for p, shard in zip(model_group, shard_group):
                    owned = leaf._get_model_param_range_map(p)["param"]
                    if shard is None or shard.numel() != owned.end - owned.start:
                        raise RuntimeError(
                            "DistributedOptimizer main shard does not match its param range "
                            "(precision-aware optimizer or FP8 params?); see excitation_dist/megatron/compat.py"
                        )
                    out.append(SteppedPiece(p, shard, owned.start, owned.end))
        return out
    raise NotImplementedError(f"unsupported megatron optimizer {kind}")


def is_distributed(leaf: Any) -> bool:
    return type(leaf).__name__ == "DistributedOptimizer"


def step_succeeded(result: Any) -> bool:
    """``MegatronOptimizer.step()`` returns ``(update_successful, grad_norm, num_zeros)``."""
    return bool(result[0] if isinstance(result, tuple) else result)


def model_config(model_chunks: Sequence[torch.nn.Module]) -> Any:
    from megatron.core.utils import get_model_config

    return get_model_config(model_chunks[0])


def backfill_typing_override() -> None:
    """megatron-core 0.19.x's ``megatron/training/models/{gpt,hybrid}.py`` import
    ``typing.override`` (Python >= 3.12). On 3.11, take it from typing_extensions."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override

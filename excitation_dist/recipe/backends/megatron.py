"""``backend: megatron`` for ``excitation-dist train``: a megatron-core GPT-MoE
(TP/SP, PP, EP, DistributedOptimizer, bf16) driven by the recipe's loop.

The recipe's loop hands over one micro-batch at a time; megatron's schedules
(pipeline parallelism in particular) run all micro-batches of a step in one
call. :class:`MegatronBackend` therefore collects the micro-batches of a step
and runs ``get_forward_backward_func()`` on the last one; the earlier calls
return a loss tensor that is filled in then (the loop reads the losses only
after the step). Works with megatron-core 0.16.1 and 0.19.x; on CPU the
``patches/megatron_cpu`` shims are applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from excitation_dist.recipe import fast_paths
from excitation_dist.recipe.backends.configs import validate
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.fast_paths import FastPaths
from excitation_dist.recipe.loop import init_process_group, run_training


def router_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``model.moe``'s router options as megatron-core TransformerConfig keywords (what megatron cannot
    express is refused when the config loads: :func:`excitation_dist.recipe.config.router_gaps`)."""
    moe = cfg.model.moe
    load_balancing = {"none": "none", "aux": "aux_loss", "seq_aux": "seq_aux_loss"}[moe.load_balancing]
    return dict(
        moe_router_score_function=moe.score_function,
        # softmax: top-k of the logits, then a softmax over those k (normalized); pre-softmax: softmax over all
        # experts, then top-k (not normalized). sigmoid: megatron always normalizes (top_k > 1).
        moe_router_pre_softmax=moe.score_function == "softmax" and (not moe.normalize_topk or moe.top_k == 1),
        moe_router_topk_scaling_factor=moe.topk_scaling_factor,
        moe_router_num_groups=moe.router_num_groups, moe_router_group_topk=moe.router_group_topk,
        moe_router_load_balancing_type=load_balancing,
        moe_aux_loss_coeff=0.0 if moe.load_balancing == "none" else moe.aux_loss_coef,
        moe_router_enable_expert_bias=moe.expert_bias, moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_z_loss_coeff=moe.z_loss_coef or None, moe_expert_capacity_factor=moe.capacity_factor,
        moe_router_dtype="fp32" if moe.router_dtype == "fp32" else None,
    )


def transformer_config(cfg: RunConfig, fast: FastPaths | None = None):
    """megatron-core's TransformerConfig for ``cfg`` (MLATransformerConfig for
    ``model.attention: mla``: DeepSeek-V2/V3 latent attention, rotary embeddings
    with ``model.rope_scaling``). The fusions, grouped GEMM and
    token dispatcher come from ``fast`` (:func:`excitation_dist.recipe.fast_paths.resolve`;
    default: resolved on this machine)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    fast = fast_paths.resolve(cfg) if fast is None else fast
    m, p, moe = cfg.model, cfg.parallel, cfg.model.moe
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fast.precision]
    config_class, attention = TransformerConfig, {}
    if m.attention == "mla":
        head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
        config_class = MLATransformerConfig
        attention = dict(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=head_dim,
                         qk_pos_emb_head_dim=m.qk_rope_head_dim, v_head_dim=head_dim, rotary_base=m.rope_theta,
                         rope_type="yarn" if m.rope_scaling == "yarn" else "rope")
        if m.rope_scaling == "yarn":
            attention.update(rotary_scaling_factor=m.rope_scaling_factor,
                             original_max_position_embeddings=m.rope_original_max_position_embeddings,
                             beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow, mscale=m.yarn_mscale,
                             mscale_all_dim=m.yarn_mscale_all_dim)
    return config_class(
        **attention, **router_kwargs(cfg), **fast.megatron_transformer_kwargs(),
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, kv_channels=m.head_dim, ffn_hidden_size=m.ffn_hidden_size,
        gated_linear_unit=m.activation == "swiglu", activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        normalization="RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm", qk_layernorm=m.qk_layernorm,
        layernorm_epsilon=m.norm_epsilon,
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_layer_freq=[0] * moe.first_dense_layers + [1] * (m.num_layers - moe.first_dense_layers),
        moe_token_dispatcher_type=fast.token_dispatcher,
        tensor_model_parallel_size=p.tensor_parallel, pipeline_model_parallel_size=p.pipeline_parallel,
        sequence_parallel=p.sequence_parallel, expert_model_parallel_size=p.expert_parallel,
        expert_tensor_parallel_size=p.expert_tensor_parallel,
        pipeline_dtype=dtype, params_dtype=torch.float32, bf16=fast.precision == "bf16",
        fp16=fast.precision == "fp16", use_cpu_initialization=fast.device == "cpu", hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False,
    )


class MegatronBackend:
    """:class:`excitation_dist.recipe.loop.TrainBackend` on megatron-core."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from excitation_dist.megatron.backend import attach

        self.cfg, self.device = cfg, device
        p, m, o = cfg.parallel, cfg.model, cfg.optimizer
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_parallel, pipeline_model_parallel_size=p.pipeline_parallel,
            expert_model_parallel_size=p.expert_parallel, expert_tensor_parallel_size=p.expert_tensor_parallel,
            distributed_timeout_minutes=max(1, round(p.timeout_minutes)),
        )
        torch.manual_seed(cfg.seed)
        model_parallel_cuda_manual_seed(cfg.seed)
        self.fast = fast = fast_paths.resolve(cfg)
        config = transformer_config(cfg, fast)
        use_te = fast.transformer_engine
        if m.attention == "mla" and not use_te:
            raise RuntimeError("model.attention: mla needs Transformer Engine (import transformer_engine failed); "
                               "use NVIDIA's PyTorch container (docker/)")
        model = GPTModel(
            config, get_gpt_decoder_block_spec(config, use_transformer_engine=use_te), vocab_size=m.vocab_size,
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope" if m.position_embedding == "rope" else "learned_absolute",
            rotary_base=int(m.rope_theta),
        )
        if device.type == "cuda":
            model.cuda(device)
        if cfg.precision != "fp32":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=fast.distributed_optimizer,
                                                   overlap_grad_reduce=fast.overlap_grad_reduce,
                                                   overlap_param_gather=fast.overlap_param_gather)
        self.model = DistributedDataParallel(config, ddp_config, model)
        config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="sgd" if o.name == "sgd" else "adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, sgd_momentum=o.beta1, clip_grad=o.clip_grad,
            decoupled_weight_decay=o.name != "adam", bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
            use_distributed_optimizer=fast.distributed_optimizer,
        ), [self.model])
        if cfg.precision == "fp16":
            config.grad_scale_func = self.optimizer.scale_loss
        self.config = config
        self.excitation = attach([self.model], self.optimizer, cfg.excitation)
        self.data_parallel_rank = ps.get_data_parallel_rank()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tokens, loss slot) of this step
        self._step = 0  # of the last save or load

    # ---------------------------------------------------------------- steps
    def _run(self, tokens_list: list[torch.Tensor], forward_only: bool) -> list[torch.Tensor]:
        """Megatron's schedule over these micro-batches; per-micro-batch LM loss
        (on every rank: the last pipeline stage broadcasts it)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq = tokens_list[0].shape[1] - 1
        micro = tokens_list[0].shape[0]
        causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=self.device), diagonal=1)
        position_ids = torch.arange(seq, device=self.device).unsqueeze(0).expand(micro, seq)

        def forward_step(data_iterator: Any, model: Any):
            tokens = next(data_iterator)
            out = model(tokens[:, :-1], position_ids, causal, labels=tokens[:, 1:])

            def loss_func(output: torch.Tensor):
                loss = output.float().mean()
                return loss, {"lm": loss.detach().clone()}  # megatron divides the loss in place by the micro-batch count

            return out, loss_func

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(tokens_list), model=[self.model],
            num_microbatches=len(tokens_list), seq_length=seq, micro_batch_size=micro, forward_only=forward_only,
        )
        losses = torch.zeros(len(tokens_list), device=self.device)
        if ps.is_pipeline_last_stage():
            losses = torch.stack([o["lm"].float().reshape(()) for o in outputs]).to(self.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(losses, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return list(losses)

    def forward_backward(self, tokens: torch.Tensor, last_micro_batch: bool, scale: float) -> torch.Tensor:
        slot = torch.zeros((), device=self.device)  # filled when the step's schedule has run
        self._pending.append((tokens, slot))
        if last_micro_batch:
            self.optimizer.zero_grad()
            self.model.zero_grad_buffer()
            losses = self._run([t for t, _ in self._pending], forward_only=False)  # averages over micro-batches itself
            for (_, s), loss in zip(self._pending, losses):
                s.fill_(loss)
            self._pending = []
        return slot

    def optimizer_step(self, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        applied, grad_norm, _ = self.optimizer.step()
        return {"grad_norm": float(grad_norm or 0.0), "applied": float(bool(applied))}

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            loss = self._run([tokens], forward_only=True)[0]
        self.model.train()
        return loss

    # ----------------------------------------------------------- checkpoints
    def _layout(self) -> dict[str, Any]:
        """What a checkpoint records of the run that wrote it (``recipe.common``)."""
        from dataclasses import asdict

        from megatron.core import parallel_state as ps

        from excitation_dist.megatron import compat

        p = self.cfg.parallel
        return {
            "world_size": dist.get_world_size(), "tensor_parallel": p.tensor_parallel,
            "pipeline_parallel": p.pipeline_parallel, "expert_parallel": p.expert_parallel,
            "expert_tensor_parallel": p.expert_tensor_parallel, "data_parallel": ps.get_data_parallel_world_size(),
            "distributed_optimizer": p.distributed_optimizer, "precision": self.cfg.precision,
            "optimizer": self.cfg.optimizer.name, "model": asdict(self.cfg.model),
            "optimizer_chain": len(compat.leaf_optimizers(self.optimizer)),  # megatron's dense / expert optimizers
        }

    def _sharded_state(self, *, loading: bool, with_rng: bool) -> dict[str, Any]:
        """The state dict ``dist_checkpointing`` saves (and, built the same way, the template it loads into)."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from excitation_dist.megatron import checkpointing, compat

        model_sd = self._gpt().sharded_state_dict()  # keys of the GPTModel itself, whatever wraps it
        state: dict[str, Any] = {
            "model": model_sd,
            # fully_reshardable: each parameter's optimizer state keyed by the parameter, in its global shape,
            # so it reshards over DP, EP, TP and PP; no chained_N prefix, so the dense/expert split may change too
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIM_METADATA),
            checkpointing.KEY: checkpointing.sharded_state_dict(self.excitation, self._moe_layers(),
                                                                compat.counts_process_group()),
            "recipe": ShardedObject(_COMMON, {"layout": self._layout(), "step": self._step}, (1,), (0,),
                                    replica_id=0 if dist.get_rank() == 0 else 1),
        }
        if with_rng:
            state["rng"] = ShardedObject(_RNG, _rng_state(), (dist.get_world_size(),), (dist.get_rank(),),
                                         replica_id=0)
        return state

    def _gpt(self) -> Any:
        """The GPTModel inside DDP (and Float16Module)."""
        from megatron.core.models.gpt import GPTModel

        model = self.model
        while not isinstance(model, GPTModel):
            model = model.module
        return model

    def _moe_layers(self) -> list[Any]:
        from excitation_dist.megatron import checkpointing

        attached = checkpointing.attachment_of(self.optimizer)
        if attached is None:
            raise RuntimeError("the megatron backend's optimizer has no Excitation attached")
        return attached[1]

    def save(self, directory: str, step: int) -> None:
        """megatron-core ``dist_checkpointing`` (torch_dist, every rank writes its
        shards into ``directory``): model, optimizer (fully_reshardable),
        Excitation (per MoE layer), the step, and every rank's RNG state."""
        from megatron.core import dist_checkpointing

        self._step = step
        _sync_params(self.model, self.optimizer)
        dist_checkpointing.save(self._sharded_state(loading=False, with_rng=True), directory,
                                validate_access_integrity=False)

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote, on this run's layout: DP, EP, TP and PP
        sizes may differ from the saving run's (megatron-core reshards); the RNG
        state is restored only on the same layout. Whatever cannot load is refused
        before any tensor is read (SystemExit naming what differs and the fix)."""
        from megatron.core import dist_checkpointing

        from excitation_dist.megatron import checkpointing, optimizer_state
        from excitation_dist.recipe import checkpoint as checkpoint_lib

        saved = _saved_common(directory)
        before, now = saved["layout"], self._layout()
        problems = _incompatible(before, now)
        if problems:
            raise SystemExit(f"megatron backend: cannot resume from checkpoint {directory}: " + "; ".join(problems)
                             + f". Resume with the settings that wrote it, or set checkpoint.dir to a new directory")
        # Excitation's state is restored only when the checkpoint holds it and this run has Excitation on;
        # otherwise Excitation stays as built (the loop's resume_from decided, by
        # checkpoint.require_excitation_state, whether starting it fresh is allowed)
        restore_excitation = self.cfg.excitation.strategy != "none" and _holds_excitation_state(directory)
        if restore_excitation:
            saved_excitation = checkpointing.saved_excitation_state(directory)
            if saved_excitation is None:
                raise SystemExit(f"megatron backend: checkpoint {directory} holds no Excitation state although its "
                                 f"{checkpoint_lib.COMPLETE} record says it does; set checkpoint.dir to a new directory")
            try:
                checkpointing.check_compatible(saved_excitation, self.excitation, where=f"checkpoint {directory}",
                                               flag="excitation.strategy")
            except ValueError as exc:
                raise SystemExit(f"megatron backend: {exc}") from None
        same_layout = all(before[k] == now[k] for k in _PLACEMENT)
        with optimizer_state.loading(self.optimizer):  # torch's Adam: megatron-core's load shares one step tensor
            template = self._sharded_state(loading=True, with_rng=same_layout)
            if not restore_excitation:
                del template[checkpointing.KEY]
            loaded = dist_checkpointing.load(template, directory, validate_access_integrity=False)
            self._gpt().load_state_dict(loaded["model"])
            self.optimizer.load_state_dict(
                _rechain(loaded["optimizer"], before.get("optimizer_chain", 1), now["optimizer_chain"]))
        if restore_excitation:
            checkpointing.load_loaded_state(self.excitation, loaded[checkpointing.KEY], self._moe_layers())
        if same_layout:
            _set_rng_state(loaded["rng"])
        elif dist.get_rank() == 0:
            print(f"megatron backend: checkpoint {directory} was written on another layout ("
                  + ", ".join(f"{k} {before[k]}" for k in _PLACEMENT) + "): its per-rank RNG states do not map "
                  "onto this run's ranks and are not restored", flush=True)
        self._step = saved["step"]


_COMMON = "recipe.common"  # ShardedObject keys may not contain "/"
_RNG = "recipe.rng_state"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
_PLACEMENT = ("world_size", "tensor_parallel", "pipeline_parallel", "expert_parallel", "expert_tensor_parallel")
# settings a resume must keep (config key -> what it changes)
_MUST_MATCH = {
    "distributed_optimizer": ("parallel.distributed_optimizer", "the optimizer state's format"),
    "precision": ("precision", "which main-parameter copies the optimizer holds"),
    "optimizer": ("optimizer.name", "the optimizer's state tensors"),
}


def _incompatible(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why a checkpoint written with layout ``before`` cannot load into ``now`` (empty: it can)."""
    out = [f"{key} was {before[name]!r} when it was written, this run has {now[name]!r} ({what} differ)"
           for name, (key, what) in _MUST_MATCH.items() if before.get(name) != now[name]]
    if not now["distributed_optimizer"] and before.get("optimizer_chain", 1) != now["optimizer_chain"]:
        out.append(f"parallel.expert_parallel was {before['expert_parallel']} when it was written, this run has "
                   f"{now['expert_parallel']}: megatron-core then splits the optimizer into dense and expert "
                   "optimizers differently, which it reshards only with parallel.distributed_optimizer: true "
                   f"(keep expert_parallel {before['expert_parallel']} > 1 or = 1 as written)")
    model_before, model_now = _flat(before.get("model", {})), _flat(now["model"])
    for key in sorted(set(model_before) & set(model_now)):  # a setting added since the save is not compared
        if key == "source" or model_before[key] == model_now[key]:
            continue
        out.append(f"model.{key} was {model_before.get(key)!r} when it was written, this run has "
                   f"{model_now.get(key)!r} (another model shape)")
    return out


def _rechain(state: dict[Any, Any], saved: int, now: int) -> dict[Any, Any]:
    """The optimizer state dict ``dist_checkpointing.load`` returned, with the
    common part (param groups) regrouped for this run's chain of optimizers.

    megatron-core splits the DistributedOptimizer into a dense and an expert
    optimizer only when their data-parallel groups differ (EP > 1); the common
    part comes back in the saving run's structure, the tensors in this run's.
    Param groups are matched by their (lr/wd multipliers, expert-parallel) keys,
    so every optimizer gets all saved groups and picks its own."""
    if saved == now:
        return state
    commons = [state[i] for i in range(saved)] if saved > 1 else [state]
    groups = [g for c in commons for g in c["optimizer"]["param_groups"]]
    extra = {k: v for k, v in commons[0].items() if not isinstance(k, int) and k not in ("optimizer", "param_state")}
    targets = [state[i] for i in range(now)] if now > 1 else [state]
    for target in targets:
        for k in [k for k in target if isinstance(k, int)]:
            if now == 1:
                del target[k]
        target.update({k: v for k, v in extra.items() if k not in target})
        target["optimizer"] = {**commons[0]["optimizer"], "param_groups": groups}
    return state


def _sync_params(model: Any, optimizer: Any) -> None:
    """All-gather the parameters before a save when megatron-core overlaps that
    all-gather with the next forward (``overlap_param_gather``, on by default on
    GPU: :mod:`excitation_dist.recipe.fast_paths`).

    After ``optimizer.step()`` each data-parallel rank then holds updated values
    only for its own shard of the DistributedOptimizer's buffer; the rest is
    one step old until the next forward's pre-hooks gather it. ``model.
    sharded_state_dict()`` would save those stale values ((DP-1)/DP of every
    parameter), and a resume would run its first forward on them. Megatron-LM
    does the same before its saves (``training.force_param_sync``). The next
    forward finds the gather done and does not repeat it."""
    if not model.ddp_config.overlap_param_gather:
        return
    prepare = getattr(optimizer, "prepare_model_params_for_param_sync", None)  # megatron-core >= 0.19
    if prepare is not None:
        prepare()
    with torch.no_grad():
        model.start_param_sync(force_sync=True)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _holds_excitation_state(directory: str) -> bool:
    """Whether the checkpoint in ``directory`` holds Excitation state to restore: its
    ``COMPLETE`` record says so (:func:`excitation_dist.recipe.checkpoint.holds_excitation_state`);
    without that record (a directory loaded directly) or with one that predates
    the resume checks, whether the torch_dist checkpoint has the Excitation objects."""
    from excitation_dist.megatron import checkpointing
    from excitation_dist.recipe.checkpoint import holds_excitation_state, read_metadata

    try:
        holds = holds_excitation_state(read_metadata(directory))
    except (OSError, ValueError):
        holds = None
    if holds is None:
        return checkpointing.saved_excitation_state(directory) is not None
    return holds


def _saved_common(directory: str) -> dict[str, Any]:
    """The ``recipe.common`` object of a checkpoint (no process group needed)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    path = Path(directory)
    if list(path.glob("rank*.pt")):
        raise SystemExit(f"megatron backend: checkpoint {directory} is in the old one-file-per-rank format "
                         "(rank00000.pt); this version reads megatron-core dist_checkpointing (torch_dist) "
                         "checkpoints only: set checkpoint.dir to a new directory")
    try:
        metadata = load_sharded_metadata(directory)
    except Exception as exc:  # noqa: BLE001 - not a dist_checkpointing directory
        raise SystemExit(f"megatron backend: checkpoint {directory} is not a megatron-core torch_dist checkpoint "
                         f"({type(exc).__name__}: {exc}); set checkpoint.dir to a new directory") from None
    common = next((obj for obj in metadata.values() if getattr(obj, "key", None) == _COMMON), None)
    if common is None:
        raise SystemExit(f"megatron backend: checkpoint {directory} was not written by excitation-dist's megatron "
                         "backend (no recipe.common object); set checkpoint.dir to a new directory")
    return dist_checkpointing.load({"c": common}, directory, validate_access_integrity=False)["c"]


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"random": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def train(cfg: RunConfig) -> int:
    cfg = fast_paths.apply_device(cfg, fast_paths.resolve(cfg))  # a GPU config on a CPU machine runs on CPU
    if cfg.device == "cpu":
        from excitation_dist.megatron.cpu_patches import quiet_known_cpu_warnings

        quiet_known_cpu_warnings()  # before megatron-core's first import
    validate(cfg)
    if cfg.device == "cpu":
        from excitation_dist.megatron import cpu_patches

        cpu_patches.apply()  # jit_eager among them: megatron's jit fusions run eagerly, nothing compiles
    device = init_process_group(cfg)
    try:
        run_training(cfg, MegatronBackend(cfg, device), device)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return 0

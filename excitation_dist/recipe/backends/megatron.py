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

from excitation_dist.config import ConfigError
from excitation_dist.recipe import fast_paths
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.fast_paths import FastPaths
from excitation_dist.recipe.loop import init_process_group, run_training


def validate(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    unsupported = {
        "parallel.context_parallel > 1": p.context_parallel != 1,
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not wired into the megatron recipe yet; "
                          "use Megatron-LM (python -m excitation_dist.recipe.pretrain_gpt)")
    if m.attention == "mla" and cfg.device == "cpu":
        raise ConfigError("model.attention: mla needs Transformer Engine's attention (megatron-core's local "
                          "DotProductAttention cannot run latent attention); use device: cuda with Transformer Engine")
    if cfg.device == "cpu" and p.expert_tensor_parallel != 1:
        raise ConfigError("parallel.expert_tensor_parallel: must be 1 on CPU (gloo cannot all-gather unevenly)")
    if p.tensor_parallel > 1 and p.expert_parallel == 1 and p.expert_tensor_parallel != p.tensor_parallel:
        raise ConfigError(
            "parallel.expert_parallel: with tensor_parallel > 1 and expert_tensor_parallel != tensor_parallel, "
            "megatron-core only synchronizes expert gradients when expert_parallel > 1; raise expert_parallel "
            "or set expert_tensor_parallel = tensor_parallel"
        )


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
                return loss, {"lm": loss.detach()}

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
    def _file(self, directory: str) -> Path:
        return Path(directory) / f"rank{dist.get_rank():05d}.pt"

    def save(self, directory: str, step: int) -> None:
        """Every rank writes its own file: model state, and per megatron optimizer
        the tensors its torch optimizer steps (fp32 main params or shards) and that
        optimizer's state. Resume needs the same parallel layout."""
        from excitation_dist.megatron import compat

        leaves = []
        for leaf in compat.leaf_optimizers(self.optimizer):
            base = compat.base_optimizer(leaf)
            if base is None:
                leaves.append(None)
                continue
            scaler = getattr(leaf, "grad_scaler", None)
            leaves.append({"main": [t.detach().clone() for g in base.param_groups for t in g["params"]],
                           "state": base.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None})
        torch.save({"model": self.model.state_dict(), "optimizers": leaves, "excitation": self.excitation.state_dict(),
                    "step": step}, self._file(directory))

    def load(self, directory: str) -> None:
        from excitation_dist.megatron import compat

        state = torch.load(self._file(directory), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        for leaf, saved in zip(compat.leaf_optimizers(self.optimizer), state["optimizers"]):
            base = compat.base_optimizer(leaf)
            if base is None or saved is None:
                continue
            with torch.no_grad():
                for t, value in zip((t for g in base.param_groups for t in g["params"]), saved["main"]):
                    t.copy_(value)
            base.load_state_dict(saved["state"])
            if saved["grad_scaler"] is not None:
                leaf.grad_scaler.load_state_dict(saved["grad_scaler"])
        self.excitation.load_state_dict(state["excitation"])


def _has_transformer_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def train(cfg: RunConfig) -> int:
    cfg = fast_paths.apply_device(cfg, fast_paths.resolve(cfg))  # a GPU config on a CPU machine runs on CPU
    validate(cfg)
    if cfg.device == "cpu":
        from torch import _dynamo

        from excitation_dist.megatron import cpu_patches

        _dynamo.config.disable = True  # megatron's jit fusions would compile with inductor (TORCHDYNAMO_DISABLE=1)
        cpu_patches.apply()
    device = init_process_group(cfg)
    try:
        run_training(cfg, MegatronBackend(cfg, device), device)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return 0

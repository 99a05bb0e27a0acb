"""Shared pieces of the megatron-core tests (run inside ``run_distributed`` workers).

A tiny GPTModel with MoE layers (local spec, SequentialMLP experts) wrapped in
megatron's DDP and optimizer, built twice from the same seed: the model under
test (Excitation attached) and a reference whose every local expert tensor that
the base optimizer steps sits in its own parameter group with learning rate
``phi * lr``. Counts are checked against an independent count: the tokens each
local expert receives (``tokens_per_expert`` at the experts' input, after
dispatch), summed over all ranks.

Layer 0's pre-MLP norm feeds the router a constant coordinate (norm weight 0,
bias 30 in coordinate 0) that the router maps to -30 for the last expert and
+30 for the others, so no token ever reaches that expert: ZeroSum gives it
phi = 0 and its parameters must stay bit-exactly unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

VOCAB, SEQ, MICRO = 64, 8, 2
HIDDEN, HEADS, FFN, MOE_FFN = 16, 2, 24, 12
NUM_LAYERS, NUM_EXPERTS = 2, 4
LR, WEIGHT_DECAY = 1e-2, 0.1
DEAD_EXPERT = NUM_EXPERTS - 1  # in (global) layer 0
ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "EXCITATION_MEGATRON_CPU": "1"}


@dataclass(frozen=True)
class Case:
    name: str
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dispatcher: str = "alltoall"
    dist_opt: bool = False
    dtype: str = "fp32"  # fp32 or bf16
    gas: int = 1  # micro-batches per optimizer step
    topk: int = 2
    recompute: bool = False

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1


def setup(case: Case) -> None:
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply_if_requested()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=case.tp,
        pipeline_model_parallel_size=case.pp,
        expert_model_parallel_size=case.ep,
        expert_tensor_parallel_size=1,
    )


def transformer_config(case: Case):
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = case.dtype == "bf16"
    extra = {}
    if case.recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        num_moe_experts=NUM_EXPERTS, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=case.topk,
        moe_token_dispatcher_type=case.dispatcher, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, tensor_model_parallel_size=case.tp, sequence_parallel=case.sequence_parallel,
        expert_model_parallel_size=case.ep, expert_tensor_parallel_size=1, pipeline_model_parallel_size=case.pp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        params_dtype=torch.float32, use_cpu_initialization=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        moe_router_dtype="fp32", **extra,
    )


def _make_dead_expert(model) -> None:
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for module in model.modules():
        if isinstance(module, BaseMoELayer) and module.layer_number == 1:
            layer = next(m for m in model.modules() if getattr(m, "mlp", None) is module)
            norm = layer.pre_mlp_layernorm
            with torch.no_grad():
                norm.weight[0] = 0.0
                norm.bias[0] = 30.0
                w = module.router.weight
                w[:, 0] = 1.0
                w[DEAD_EXPERT, 0] = -1.0


def build(case: Case, *, per_expert_lr: bool, seed: int = 1234):
    """(model chunk wrapped in DDP, megatron optimizer) for this rank's pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(case)
    model = GPTModel(
        config, get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="learned_absolute",
    )
    _make_dead_expert(model)
    if case.dtype == "bf16":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)  # casts params and inputs, as Megatron-LM's get_model does
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=case.dist_opt, overlap_grad_reduce=False,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, bf16=case.dtype == "bf16",
        use_distributed_optimizer=case.dist_opt, clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.99,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    if per_expert_lr:
        split_expert_param_groups(model, optimizer)
    return model, optimizer


# ----------------------------------------------------------------- reference
def expert_params(model):
    """(global layer index, global expert, parameter) of this rank's routed experts."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for module in model.modules():
        if isinstance(module, BaseMoELayer):
            for j, expert in enumerate(module.experts.local_experts):
                for p in expert.parameters():
                    yield module.layer_number - 1, module.local_expert_indices[j], p


def _leaf_optimizers(optimizer):
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]


def _belongs_to(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """True if ``tensor`` is the optimizer's copy of (a piece of) ``param``:
    its fp32 main copy, or a view into its storage (fp32 DistributedOptimizer shard)."""
    if getattr(param, "main_param", None) is tensor or tensor is param:
        return True
    if tensor.dtype != param.dtype or tensor.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return False
    lo = param.storage_offset()
    return lo <= tensor.storage_offset() < lo + param.numel()


def split_expert_param_groups(model, optimizer) -> None:
    """Give every stepped tensor of a routed expert its own param group
    (``group["slot"] = (global layer, global expert)``)."""
    experts = list(expert_params(model))
    for leaf in _leaf_optimizers(optimizer):
        groups = []
        for group in leaf.optimizer.param_groups:
            rest = []
            for t in group["params"]:
                owner = [(layer, e) for layer, e, p in experts if _belongs_to(t, p)]
                if owner:
                    groups.append({**group, "params": [t], "slot": owner[0]})
                else:
                    rest.append(t)
            groups.insert(0, {**group, "params": rest})
        leaf.optimizer.param_groups = [g for g in groups if g["params"]]


def set_expert_lrs(optimizer, phi_LE: torch.Tensor) -> None:
    """``phi_LE`` is indexed by global layer."""
    for leaf in _leaf_optimizers(optimizer):
        for group in leaf.optimizer.param_groups:
            if "slot" in group:
                layer, e = group["slot"]
                group["lr"] = LR * float(phi_LE[layer, e])


def zerosum_gamma1(counts_LE: torch.Tensor) -> torch.Tensor:
    """The paper's ZeroSum with gamma = 1: phi_k = c_k / mean_j c_j (phi = 1 for an empty layer)."""
    c = counts_LE.to(torch.float64)
    mean = c.mean(-1, keepdim=True)
    return torch.where(mean > 0, c / mean.clamp_min(1e-30), torch.ones_like(c))


class ExpertInputCounter:
    """Tokens each local expert receives (``tokens_per_expert`` passed to the
    experts module), indexed by (global layer, global expert)."""

    def __init__(self, model) -> None:
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer

        self.counts_LE = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
        for module in model.modules():
            if isinstance(module, BaseMoELayer):
                module.experts.register_forward_pre_hook(self._hook(module))

    def _hook(self, moe):
        def hook(experts, args):
            if experts.training and torch.is_grad_enabled():
                tokens = torch.as_tensor(args[1]).to(torch.int64).reshape(-1)
                for j, e in enumerate(moe.local_expert_indices):
                    self.counts_LE[moe.layer_number - 1, e] += int(tokens[j])
        return hook

    def global_counts(self) -> torch.Tensor:
        out = self.counts_LE.clone()
        dist.all_reduce(out)
        self.counts_LE.zero_()
        return out


# ---------------------------------------------------------------- training
def batch(case: Case, step: int, micro: int) -> dict:
    from megatron.core import parallel_state as ps

    rank = ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def train_step(model, optimizer, case: Case, step: int, before_step=None):
    """One optimizer step of ``case.gas`` micro-batches through megatron's schedule.
    Returns ``optimizer.step()``'s result."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = iter([batch(case, step, m) for m in range(case.gas)])
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b["tokens"], position_ids, mask, labels=b["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    optimizer.zero_grad()
    model.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=case.gas,
        seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
    )
    if before_step is not None:
        before_step()
    return optimizer.step()


def flat_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def worker_env() -> dict[str, str]:
    return dict(ENV)


if __name__ == "__main__":  # pragma: no cover
    print(os.environ.get("EXCITATION_MEGATRON_CPU"))

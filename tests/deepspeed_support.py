"""Shared pieces of the DeepSpeed tests (run inside ``run_distributed`` workers).

A tiny MoE net on ``deepspeed.moe.layer.MoE`` whose sizes make ZeRO partitions
split an expert parameter mid-tensor, a reference engine that runs each expert
with learning rate phi * lr instead of Excitation, and an independent count of
the tokens each expert actually processed: non-zero rows of the expert's input
after dispatch (and all-to-all), summed over all ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, MICRO, D_MODEL = 32, 8, 4, 12
NUM_EXPERTS = 4
FF_PER_LAYER = (17, 19)  # unequal expert sizes: ZeRO partition boundaries fall inside an expert
LR, WEIGHT_DECAY = 1e-2, 0.1
DEAD_EXPERT = NUM_EXPERTS - 1  # in layer 0 no token ever routes here: ZeroSum gives it phi = 0


@dataclass(frozen=True)
class Case:
    name: str
    zero: int = 0
    dtype: str = "fp32"  # fp32, bf16, fp16
    ep: int = 1
    k: int = 2
    gas: int = 1
    config_optimizer: bool = False  # DeepSpeed "optimizer" section (torch_adam) instead of a client optimizer
    offload: bool = False
    bf16_optimizer: bool = False  # bf16 + ZeRO-1 + fp32 gradient accumulation -> BF16_Optimizer
    counts: str = "processed"
    overflow_step: int = -1  # fp16: inject an overflow at this step
    overflow_scale: float = 1e30  # the loss is multiplied by this at overflow_step
    # DeepSpeed calls the overflow step applied although the base optimizer never ran
    # (ZeRO-0 + torch_autocast fp16: its GradScaler skips optimizer.step())
    overflow_reported_applied: bool = False
    reentrant_layer0: bool = False  # the engine under test runs MoE layer 0 under reentrant checkpointing
    # client optimizer: "torch" (torch.optim.AdamW) or "fused_adam" (DeepSpeed's FusedAdam class with its CUDA
    # kernel transcribed in torch, tests/fused_adam_kernel.py)
    optimizer: str = "torch"
    extra: dict = field(default_factory=dict)


def setup_deepspeed() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from excitation_dist.deepspeed.compat import skip_cpu_shm_comm_build

    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


class TinyMoENet(nn.Module):
    """Embedding (positive) -> MoE layers with residuals -> LM head."""

    def __init__(self, case: Case, seed: int = 0, reentrant_layer0: bool = False) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(seed)
        self.reentrant_layer0 = reentrant_layer0
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.moes = nn.ModuleList()
        for ff in FF_PER_LAYER:
            expert = nn.Sequential(nn.Linear(D_MODEL, ff), nn.ReLU(), nn.Linear(ff, D_MODEL))
            self.moes.append(MoE(D_MODEL, expert, num_experts=NUM_EXPERTS, ep_size=case.ep, k=case.k,
                                 capacity_factor=1.0, min_capacity=1, use_rts=False,
                                 top2_2nd_expert_sampling=False))
        self.head = nn.Linear(D_MODEL, VOCAB)
        with torch.no_grad():  # positive inputs to layer 0 and a negative router row: expert 3 is never chosen
            self.embed.weight.abs_().add_(0.2)
            wg = self.moes[0].deepspeed_moe.gate.wg.weight
            wg.abs_()
            wg[DEAD_EXPERT] = -wg[DEAD_EXPERT]
        self.routed_counts = []  # DeepSpeed's own exp_counts per layer, this forward

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = self.embed(x)
        aux = 0.0
        self.routed_counts = []
        for i, moe in enumerate(self.moes):
            if i == 0 and self.reentrant_layer0 and self.training:  # original forward under no_grad, recompute in backward
                out, l_aux, exp_counts = torch.utils.checkpoint.checkpoint(moe, h, use_reentrant=True)
            else:
                out, l_aux, exp_counts = moe(h)
            self.routed_counts.append(exp_counts.detach().to(torch.int64))
            h = h + out
            aux = aux + l_aux
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)) + 0.01 * aux


def tokens(step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * dist.get_rank() + micro)
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)


def ds_config(case: Case) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": case.gas,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": case.zero},
        "zero_allow_untested_optimizer": True,
    }
    if case.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if case.bf16_optimizer:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    if case.offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if case.config_optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}}
    cfg.update(case.extra)
    return cfg


def expert_slots(model: TinyMoENet):
    """(layer, local expert j, module) for every local expert."""
    for layer, moe in enumerate(model.moes):
        for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            yield layer, j, expert


def ep_rank(case: Case) -> int:
    from deepspeed.utils import groups

    return dist.get_rank(group=groups._get_expert_parallel_group(f"ep_size_{case.ep}"))


def build_engine(case: Case, *, per_expert_lr: bool, seed: int = 0):
    """The engine under test (``per_expert_lr=False``) or the reference whose
    every local expert has its own parameter group (lr set per step)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = TinyMoENet(case, seed, reentrant_layer0=case.reentrant_layer0 and not per_expert_lr)
    if case.config_optimizer and not per_expert_lr:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config(case))
        return engine
    if per_expert_lr:
        in_expert = set()
        groups = []
        for layer, j, expert in expert_slots(model):
            params = list(expert.parameters())
            in_expert |= {id(p) for p in params}
            groups.append({"name": f"l{layer}e{j}", "params": params, "slot": (layer, j)})
        groups.insert(0, {"name": "dense", "params": [p for p in model.parameters() if id(p) not in in_expert]})
    else:
        groups = [{"name": "all", "params": list(model.parameters())}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    if case.optimizer == "fused_adam":
        import pytest

        from tests.fused_adam_kernel import install_deepspeed_fused_adam

        install_deepspeed_fused_adam(pytest.MonkeyPatch())  # this worker process only
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(groups, lr=LR, weight_decay=WEIGHT_DECAY, adam_w_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case))
    return engine


class ExpertInputCounter:
    """Tokens each local expert receives (non-zero rows of its input), mapped to
    global experts; :meth:`global_counts` sums them over all ranks."""

    def __init__(self, model: TinyMoENet, case: Case) -> None:
        self.counts_LE = torch.zeros(len(FF_PER_LAYER), NUM_EXPERTS, dtype=torch.int64)
        first = ep_rank(case) * (NUM_EXPERTS // case.ep)
        for layer, j, expert in expert_slots(model):
            expert.register_forward_hook(self._hook(layer, first + j))

    def _hook(self, layer: int, global_expert: int):
        def hook(module, args, output):
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                rows = args[0].reshape(-1, D_MODEL)
                self.counts_LE[layer, global_expert] += int((rows != 0).any(-1).sum())
        return hook

    def global_counts(self) -> torch.Tensor:
        out = self.counts_LE.clone()
        dist.all_reduce(out)
        self.counts_LE.zero_()
        return out


def zerosum_gamma1(counts_LE: torch.Tensor) -> torch.Tensor:
    """The paper's ZeroSum with gamma = 1, written out: phi_k = c_k / mean_j c_j."""
    c = counts_LE.to(torch.float64)
    return c / c.mean(-1, keepdim=True)


def set_expert_lrs(engine, case: Case, phi_LE: torch.Tensor) -> None:
    first = ep_rank(case) * (NUM_EXPERTS // case.ep)
    for group in engine.basic_optimizer.param_groups:
        if "slot" in group:
            layer, j = group["slot"]
            group["lr"] = LR * float(phi_LE[layer, first + j])


def flat_params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The fp32 master copy of every parameter, whole (a collective under ZeRO):
    ZeRO-1/2 and BF16_Optimizer partitions assembled by DeepSpeed's
    ``safe_get_full_fp32_param``; the FP16 wrappers' fp32 copies; fp32 params themselves."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    copies = {}
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat copy per group
        for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for lp in lp_group:
                copies[id(lp)] = flat[offset:offset + lp.numel()]
                offset += lp.numel()
    elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            copies.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = copies.get(id(p), p)
        assert full.dtype == torch.float32, (name, full.dtype)
        out[name] = full.detach().reshape(p.shape).clone()
    return out

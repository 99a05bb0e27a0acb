"""``backend: torch`` for ``excitation-dist train``: the recipe's GPT-MoE
(:mod:`excitation_dist.models`, plain-PyTorch experts) under DDP (experts
replicated), any process count, CPU or CUDA, Excitation attached with
:func:`excitation_dist.torch.attach`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from excitation_dist.models import GPTMoE
from excitation_dist.recipe.backends.configs import gpt_moe_config, validate
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.loop import init_process_group, run_training
from excitation_dist.torch.backend import attach

STATE_FILE = "state.pt"


def scalar(value: torch.Tensor) -> float:
    """A reduced value (the gradient norm) as a number; a DTensor's (FSDP2) through its full value."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.beta1, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


class TorchDDPBackend:
    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = GPTMoE(gpt_moe_config(cfg, "torch")).to(device)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model) if distributed else self.model
        self.optimizer = optimizer(cfg, self.wrapped.parameters())
        self.excitation = attach(self.wrapped, self.optimizer, cfg.excitation)
        self.data_parallel_rank = dist.get_rank() if dist.is_initialized() else 0

    def forward_backward(self, tokens: torch.Tensor, last_micro_batch: bool, scale: float) -> torch.Tensor:
        sync = last_micro_batch or not isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else self.wrapped.no_sync():
            loss = self.wrapped(tokens)  # through the DDP wrapper: its gradient hooks
            (loss * scale).backward()
        return self.model.last_losses["ce"]

    def optimizer_step(self, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.cfg.optimizer.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_expert_biases()  # model.moe.expert_bias: aux-loss-free balancing, once per step
        return {"grad_norm": scalar(norm), "applied": 1.0}

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            _, lm = self.model.lm_losses(tokens)
        self.model.train()
        return lm

    def save(self, directory: str, step: int) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:  # replicas are identical under DDP
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "excitation": self.excitation.state_dict(), "step": step}, Path(directory) / STATE_FILE)

    def load(self, directory: str) -> None:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("excitation") is not None:  # absent: Excitation starts fresh (the loop has said so)
            self.excitation.load_state_dict(state["excitation"])


def run(cfg: RunConfig, backend: type) -> int:
    """Join the process group, train ``backend(cfg, device)`` with the recipe's loop, leave the group."""
    device = init_process_group(cfg)
    try:
        run_training(cfg, backend(cfg, device), device)
    finally:
        dist.destroy_process_group()
    return 0


def train(cfg: RunConfig) -> int:
    validate(cfg)
    return run(cfg, TorchDDPBackend)

"""``backend: deepspeed`` for ``excitation-dist train``.

The run config becomes a DeepSpeed engine: the recipe's GPT-MoE
(:mod:`excitation_dist.models`, ``deepspeed.moe`` experts) built from ``model.*`` (expert parallel over ``parallel.expert_parallel``
ranks), a DeepSpeed JSON config generated from ``schedule``, ``optimizer``,
``precision`` and ``parallel.zero_stage`` (an optional ``deepspeed_config``
JSON file is merged under it), and Excitation attached with
:func:`excitation_dist.deepspeed.attach`. The recipe loop
(:mod:`excitation_dist.recipe.loop`) owns batches, the learning-rate schedule,
progress, metrics and atomic checkpoints; checkpoints go through
``engine.save_checkpoint`` and carry the Excitation state.

Launch with ``excitation-dist train CONFIG`` (one node: re-launches itself
under torchrun), ``torchrun ... -m excitation_dist.cli train CONFIG``, or the
DeepSpeed launcher: ``deepspeed [--hostfile H] --module excitation_dist.cli
train CONFIG`` (see ``launch/``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from excitation_dist.models import GPTMoE
from excitation_dist.recipe.backends.configs import deepspeed_config, gpt_moe_config, validate
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.loop import init_process_group, run_training

CHECKPOINT_TAG = "deepspeed"


def moe_param_groups(model: torch.nn.Module, weight_decay: float, max_group_size: int | None = None) -> list[dict]:
    """Parameter groups for a client optimizer under DeepSpeed: decay on matrices
    only, then split so expert parameters get their own (expert-data-parallel)
    groups, as ZeRO requires for MoE (at most ``max_group_size`` elements each)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=max_group_size)


def _client_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    groups = moe_param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.beta1)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class DeepSpeedBackend:
    """:class:`excitation_dist.recipe.loop.TrainBackend` on a DeepSpeed engine."""

    def __init__(self, cfg: RunConfig) -> None:
        import deepspeed

        import excitation_dist.deepspeed as exds
        from excitation_dist.deepspeed.compat import base_optimizer, check_version

        check_version()
        torch.manual_seed(cfg.seed)
        self.model = GPTMoE(gpt_moe_config(cfg, "deepspeed"))
        ds_config = deepspeed_config(cfg)
        # DeepSpeed print()s "No existing process group found, creating a new group named: ep_size_N" on every
        # rank for every expert group it creates (its normal path, not a problem): keep rank 0's other prints only.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            if "optimizer" in ds_config:  # DeepSpeed builds it (e.g. FusedAdam on GPUs); lr still set every step
                # MoE parameter groups (expert-data-parallel ones apart), as ZeRO requires for MoE
                self.engine, *_ = deepspeed.initialize(
                    model=self.model, model_parameters=moe_param_groups(self.model, cfg.optimizer.weight_decay),
                    config=ds_config)
            else:
                self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=_client_optimizer(cfg, self.model),
                                                       config=ds_config)
        if dist.get_rank() == 0:
            sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                     if not line.startswith("No existing process group found")))
        self.base_optimizer = base_optimizer(self.engine)
        self.excitation = exds.attach(self.engine, cfg.excitation)
        self.data_parallel_rank = dist.get_rank()  # every rank sees distinct tokens (no TP/PP/CP here)
        self.device = self.engine.device

    def forward_backward(self, tokens: torch.Tensor, last_micro_batch: bool, scale: float) -> torch.Tensor:
        # DeepSpeed divides the loss by the accumulation steps itself; ``scale`` is not needed.
        loss = self.engine(tokens)
        self.engine.backward(loss)
        if not last_micro_batch:
            self.engine.step()  # bookkeeping only: not a gradient-accumulation boundary
        return self.model.last_losses["ce"]

    def optimizer_step(self, lr: float) -> dict[str, float]:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan"),
                "applied": float(self.engine.was_step_applied())}

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            _, ce = self.model.lm_losses(tokens)
        self.model.train()
        return ce.detach()

    def _rng_file(self, directory: str) -> Path:
        return Path(directory) / f"rng_rank{dist.get_rank():05d}.pt"

    def save(self, directory: str, step: int) -> None:
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"step": step})
        # DeepSpeed's gates draw random numbers (random token selection); keep each rank's generators.
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, self._rng_file(directory))

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        if path is None:
            raise RuntimeError(f"{directory} holds no DeepSpeed checkpoint '{CHECKPOINT_TAG}'")
        rng_file = self._rng_file(directory)
        if not rng_file.is_file():
            raise RuntimeError(f"{rng_file} is missing: the checkpoint was written by a different number of ranks")
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def train(cfg: RunConfig) -> int:
    validate(cfg)
    from excitation_dist.deepspeed.compat import init_distributed

    if cfg.device == "cpu" and torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The process group first (timeout, restart-safe rendezvous); DeepSpeed adopts it.
    init_process_group(cfg)
    init_distributed()
    # DeepSpeed 0.19's ZeRO all-gathers call torch's deprecated all_gather_into_tensor on every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    try:
        backend = DeepSpeedBackend(cfg)
        run_training(cfg, backend, backend.device)
    finally:
        dist.destroy_process_group()
    return 0

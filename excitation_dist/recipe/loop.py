"""The recipe's training loop, shared by the backends that drive their own
optimizer step (plain PyTorch DDP, DeepSpeed).

A backend implements :class:`TrainBackend`: it builds the model, optimizer and
Excitation controller, runs one micro-batch forward+backward, the optimizer
step, evaluation, and saves/loads its state into a directory. The loop owns
everything else: batches, learning-rate schedule, gradient accumulation,
progress, metrics, atomic checkpoints and resume.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import time
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from excitation_dist.core import Excitation
from excitation_dist.recipe.checkpoint import CheckpointManager, holds_excitation_state, read_metadata, resume_metadata
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.data import TokenSource, train_position
from excitation_dist.recipe.metrics_log import MetricsLogger, excitation_record


class TrainBackend(Protocol):
    excitation: Excitation
    data_parallel_rank: int

    def forward_backward(self, tokens: torch.Tensor, last_micro_batch: bool, scale: float) -> torch.Tensor:
        """Loss of one micro-batch (detached LM loss); gradients accumulate."""

    def optimizer_step(self, lr: float) -> dict[str, float]:
        """Clip, step, zero gradients. Returns at least ``grad_norm`` and ``applied`` (0/1)."""

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """LM loss of a validation batch (no counts, no gradients)."""

    def save(self, directory: str, step: int) -> None:
        """Write this rank's share of the state (model, optimizer, Excitation)."""

    def load(self, directory: str) -> None:
        """Restore the state written by :meth:`save` (Excitation's state too
        where the checkpoint holds it; else Excitation stays as built)."""


def restart_safe_store(timeout: timedelta) -> dist.Store | None:
    """The store ranks rendezvous through, in a namespace of their own per torchrun restart.

    torchrun (torch >= 2.4) lets its workers share the agent's rendezvous
    TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that store across
    ``--max-restarts``; the keys a process group writes there carry no attempt
    number. A restarted rank then reads the previous attempt's peer addresses:
    gloo's ``connectFullMesh`` connects to dead ports (``Connection refused``) or
    waits for a peer that connects elsewhere (a hang until the timeout). A
    ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT`` gives every attempt fresh
    keys. None when not under a torchrun agent store (env:// is then fine)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"excitation_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_process_group(cfg: RunConfig) -> torch.device:
    """This rank's device (``cuda:LOCAL_RANK``, made current, or the CPU) and the
    default process group on it (NCCL or gloo), for every recipe backend: a
    rank waiting longer than ``parallel.timeout_minutes`` for its peers (at
    start-up or in a collective) fails instead of hanging, and restarts under
    ``torchrun --max-restarts`` rendezvous afresh (:func:`restart_safe_store`)."""
    if cfg.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    store = restart_safe_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return device


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up to ``optimizer.lr``, then cosine/linear decay to ``min_lr`` (step is 1-based)."""
    o, s = cfg.optimizer, cfg.schedule
    if s.warmup_steps and step <= s.warmup_steps:
        return o.lr * step / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    progress = (step - s.warmup_steps) / max(1, s.train_steps - s.warmup_steps)
    factor = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
    return o.min_lr + (o.lr - o.min_lr) * factor


def _mean_over_ranks(value: torch.Tensor, device: torch.device) -> float:
    value = value.detach().to(device, torch.float32).clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _held_out_loss(backend: TrainBackend, batch, steps: int, device: torch.device) -> float:
    """Mean LM loss over ``steps`` held-out micro-batches ``batch(index, rank)``, averaged over ranks."""
    loss = torch.stack([backend.eval_loss(batch(i, backend.data_parallel_rank).to(device))
                        for i in range(steps)]).mean()
    return _mean_over_ranks(loss, device)


def resume_from(cfg: RunConfig, backend: TrainBackend, checkpoint, rank: int) -> None:
    """Load ``checkpoint`` into ``backend`` after the checks ``excitation-dist
    train`` ran before launch (:func:`~excitation_dist.recipe.preflight.resume_check`,
    repeated here against the checkpoint actually loaded). A checkpoint without
    Excitation state, resumed with Excitation on, leaves Excitation as built
    (step 0, no EMA)."""
    from excitation_dist.recipe.preflight import resume_check

    problems, notes = resume_check(cfg, checkpoint)
    if problems:
        raise SystemExit("excitation-dist train: " + "\n".join(problems))
    if rank == 0:
        for note in notes:
            print(f"excitation-dist train: {note}", flush=True)
    fresh = cfg.excitation.strategy != "none" and holds_excitation_state(read_metadata(checkpoint)) is False
    built = copy.deepcopy(backend.excitation.state_dict()) if fresh else None
    backend.load(str(checkpoint))
    if built is not None:
        backend.excitation.load_state_dict(built)


def run_training(cfg: RunConfig, backend: TrainBackend, device: torch.device) -> dict[str, float]:
    """Train ``backend`` as ``cfg`` says; returns the final metrics (rank 0 logs)."""
    # What exists now (imported modules, the model, the optimizer, the data) lives for the whole run: out of the
    # cyclic collector's reach, the full collections megatron-core runs in every save and load (two per save)
    # scan only what training creates (measured on this CPU: 0.16-0.23 s each before, a 6-step run with 3 saves
    # spent 2.2 s per rank in them)
    gc.freeze()
    rank = dist.get_rank() if dist.is_initialized() else 0
    s = cfg.schedule
    accumulation = cfg.gradient_accumulation_steps
    manager = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last) if cfg.checkpoint.dir else None
    latest = manager.latest() if manager and cfg.checkpoint.resume else None
    # the samples read on from the checkpoint's consumed samples, in the dataset it was read from
    position, _ = train_position(cfg, read_metadata(latest) if latest is not None else None)
    source = TokenSource.from_config(cfg, position)

    start = 0
    if manager and rank == 0:
        manager.remove_leftovers()
        if latest is None and cfg.checkpoint.resume:
            print(f"checkpoint.dir {manager.root} holds no complete checkpoint: training from step 0", flush=True)
    if latest is not None:
        resume_from(cfg, backend, latest, rank)
        start = manager.step_of(latest)
        if rank == 0:
            print(f"resumed from {latest} (step {start})", flush=True)
            print(f"data: reading on from sample {position.consumed} (the samples the checkpoint consumed)",
                  flush=True)

    # TensorBoard, metrics.jsonl, W&B if logging.wandb.project; records of steps redone after `start` replaced
    logger = MetricsLogger.from_config(cfg, rank, start_step=start)
    if logger.dropped:
        print(f"metrics.jsonl: dropped {logger.dropped} record(s) of steps after {start}, which this run redoes",
              flush=True)
    tokens_per_step = s.global_batch_size * cfg.model.seq_length
    t_start, last = time.perf_counter(), {}
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start + 1, s.train_steps + 1):
        lr = learning_rate(cfg, step)
        losses = []
        for micro in range(accumulation):
            tokens = source.train_batch(step, micro, backend.data_parallel_rank)
            losses.append(backend.forward_backward(tokens.to(device), micro == accumulation - 1, 1.0 / accumulation))
        stats = backend.optimizer_step(lr)
        window_steps += 1
        loss = _mean_over_ranks(torch.stack(losses).mean(), device)
        last = {"loss": loss, "lr": lr, **stats}

        if step % cfg.logging.interval == 0 or step == s.train_steps or step == start + 1:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
            window_start, window_steps = time.perf_counter(), 0
            eta = (time.perf_counter() - t_start) / (step - start) * (s.train_steps - step)
            last["tokens_per_s"] = tokens_per_s
            logger.log(step, {**last, **excitation_record(backend.excitation, per_layer=logger.layers_due(step))})
            if rank == 0:
                print(f"step {step:>6}/{s.train_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm "
                      f"{stats.get('grad_norm', float('nan')):.3f} | {tokens_per_s:,.0f} tokens/s | ETA {eta:,.0f} s | "
                      f"phi {backend.excitation.last_multipliers_LE.min():.2f}..{backend.excitation.last_multipliers_LE.max():.2f}",
                      flush=True)

        if s.eval_interval and (step % s.eval_interval == 0 or step == s.train_steps):
            last["val_loss"] = _held_out_loss(backend, source.validation_batch, s.eval_steps, device)
            logger.log(step, {"val_loss": last["val_loss"]})
            if rank == 0:
                print(f"step {step:>6} | validation loss {last['val_loss']:.4f}", flush=True)
        if step == s.train_steps and source.test is not None and s.eval_steps:
            # the test split, once, after the last step (Megatron-LM's do_test): the figure a report quotes
            # when the validation loss chose among runs
            last["test_loss"] = _held_out_loss(backend, source.test_batch, s.eval_steps, device)
            logger.log(step, {"test_loss": last["test_loss"]})
            if rank == 0:
                print(f"step {step:>6} | test loss {last['test_loss']:.4f}", flush=True)

        if manager and (step % cfg.checkpoint.interval == 0 or step == s.train_steps):
            if rank == 0:
                manager.prepare(step)
            if dist.is_initialized():
                dist.barrier()
            backend.save(str(manager.staging_dir(step)), step)
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                path = manager.publish(step, resume_metadata(
                    cfg, excitation_state=getattr(backend, "saves_excitation_state", True),
                    data=source.record(cfg, step)))
                print(f"saved {path}", flush=True)
    logger.close()
    return last

"""Train the GPT-style MoE (:mod:`.model`) with DeepSpeed and Excitation.

Byte-level tokens from the embedded corpus (no download). Launch with any of::

    deepspeed --num_gpus 2 --module excitation_dist.deepspeed.train --ds-config configs/deepspeed/tiny_cpu.json
    deepspeed --hostfile hosts --launcher pdsh --module excitation_dist.deepspeed.train --ds-config ...
    torchrun --nproc-per-node 2 -m excitation_dist.deepspeed.train --ds-config configs/deepspeed/tiny_cpu.json

Without a GPU it runs on DeepSpeed's CPU accelerator over gloo. Micro-batch
size, gradient accumulation, ZeRO stage, precision and (optionally) the
optimizer come from the DeepSpeed JSON config; without an "optimizer" section
a client AdamW is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds-config", "--deepspeed_config", dest="ds_config", required=True,
                        help="DeepSpeed JSON config (see configs/deepspeed/)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1)
    g = parser.add_argument_group("model")
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ff", type=int, default=128, help="hidden size of each expert")
    g.add_argument("--experts", type=int, default=4)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks")
    g.add_argument("--capacity-factor", type=float, default=1.25)
    g.add_argument("--aux-loss-coef", type=float, default=0.01)
    g.add_argument("--z-loss-coef", type=float, default=0.0)
    g.add_argument("--lr", type=float, default=3e-3, help="client AdamW only (no optimizer in the JSON)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="client AdamW only")
    e = parser.add_argument_group("excitation")
    e.add_argument("--strategy", default="zerosum", help="zerosum, positivesum, expdiff, none, ... (none: counts only)")
    e.add_argument("--gamma", type=float, default=1.0)
    e.add_argument("--counts", choices=["processed", "routed"], default="processed")
    e.add_argument("--excitation-config", help="YAML with an 'excitation' mapping; overrides the three flags above")
    c = parser.add_argument_group("checkpoint")
    c.add_argument("--checkpoint-dir", help="save here (and resume from here with --resume)")
    c.add_argument("--save-every", type=int, default=0, help="optimizer steps between saves (0: only at the end)")
    c.add_argument("--resume", action="store_true", help="load the latest checkpoint in --checkpoint-dir first")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def _excitation_config(args: argparse.Namespace):
    from excitation_dist.config import ExcitationConfig

    if args.excitation_config:
        return ExcitationConfig.from_yaml(args.excitation_config)
    return ExcitationConfig(strategy=args.strategy, gamma=args.gamma, counts=args.counts)


def _init_distributed() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from excitation_dist.deepspeed.compat import skip_cpu_shm_comm_build

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_cpu_shm_comm_build()
        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)


def run(args: argparse.Namespace) -> int:
    from excitation_dist.config import ConfigError

    try:
        ex_config = _excitation_config(args)
        ds_config = json.loads(Path(args.ds_config).read_text())
    except (ConfigError, OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"excitation_dist.deepspeed.train: {exc}") from None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise SystemExit("excitation_dist.deepspeed.train: ZeRO-3 does not support deepspeed.moe layers; use stage 0, 1 or 2")

    _init_distributed()
    import deepspeed
    import torch
    import torch.distributed as dist

    import excitation_dist.deepspeed as exds
    from excitation_dist.data import byte_batches, embedded_corpus_bytes
    from excitation_dist.deepspeed.compat import check_version
    from excitation_dist.deepspeed.model import GPTMoE, GPTMoEConfig, moe_param_groups

    check_version()
    torch.manual_seed(args.seed)
    model = GPTMoE(GPTMoEConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                                d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k, ep_size=args.ep_size,
                                capacity_factor=args.capacity_factor, aux_loss_coef=args.aux_loss_coef,
                                z_loss_coef=args.z_loss_coef))
    if "optimizer" in ds_config:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    else:
        optimizer = torch.optim.AdamW(moe_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    excitation = exds.attach(engine, ex_config)

    rank, world = dist.get_rank(), dist.get_world_size()
    start = 0
    if args.resume:
        if not args.checkpoint_dir:
            raise SystemExit("excitation_dist.deepspeed.train: --resume needs --checkpoint-dir")
        load_path, client_state = engine.load_checkpoint(args.checkpoint_dir)
        if load_path is not None:
            start = int(client_state["step"])
    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes()), dtype=torch.uint8)
    gas, micro = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        print(f"excitation_dist.deepspeed.train: {world} ranks, ZeRO {engine.zero_optimization_stage()}, "
              f"{type(engine.optimizer).__name__}, micro {micro} x accumulation {gas}, excitation {ex_config.strategy} "
              f"gamma {ex_config.gamma}", flush=True)

    def save(step: int) -> None:
        if args.checkpoint_dir:
            engine.save_checkpoint(args.checkpoint_dir, client_state={"step": step})

    for step in range(start, args.steps):
        t0 = time.perf_counter()
        losses = []
        for m in range(gas):
            batch = byte_batches(corpus, micro, args.seq_len, step * gas + m, rank=rank, seed=args.seed)
            loss = engine(batch.to(engine.device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        if rank == 0 and (step + 1) % args.log_every == 0:
            m = excitation.metrics()
            phi = excitation.last_multipliers_LE
            print(json.dumps({"step": step + 1, "loss": round(sum(losses) / gas, 4), **model.last_losses,
                              "phi_min": round(float(phi.min()), 3), "phi_max": round(float(phi.max()), 3),
                              "excitation_step": int(m["excitation/step"]),
                              "step_ms": round(1000 * (time.perf_counter() - t0), 1)}), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            save(step + 1)
    if args.checkpoint_dir and not (args.save_every and args.steps % args.save_every == 0):
        save(args.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m excitation_dist.deepspeed.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

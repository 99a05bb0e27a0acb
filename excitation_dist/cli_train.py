"""``excitation-dist train CONFIG [key.sub=value ...]``.

The config is read and validated first, before any process group starts. Under
a launcher (torchrun, the deepspeed launcher, srun + torchrun) each rank runs
the configured backend's training loop. Started by hand on one node, it
re-launches itself under torchrun with ``parallel.gpus_per_node`` processes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

BACKENDS = {
    "deepspeed": "excitation_dist.deepspeed.recipe",
    "megatron": "excitation_dist.megatron.recipe",
    "torch": "excitation_dist.torch.recipe",
}
_PRINTABLE = ("gpus_per_node", "nodes", "world_size", "backend", "data_parallel", "gradient_accumulation_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. schedule.train_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print the layout, and exit")
    parser.add_argument("--print", choices=_PRINTABLE, dest="print_field",
                        help="print one derived value of the config (for launch scripts) and exit")


def _launched() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _layout(cfg) -> str:
    p = cfg.parallel
    return (
        f"{cfg.name}: backend {cfg.backend}, {cfg.device}, {cfg.precision}; "
        f"{p.nodes} node(s) x {p.gpus_per_node} = {p.world_size} ranks: TP {p.tensor_parallel}, "
        f"PP {p.pipeline_parallel}, CP {p.context_parallel}, DP {p.data_parallel}, EP {p.expert_parallel}; "
        f"micro batch {cfg.schedule.micro_batch_size}, global batch {cfg.schedule.global_batch_size} "
        f"({cfg.gradient_accumulation_steps} accumulation steps); "
        f"Excitation {cfg.excitation.strategy} gamma {cfg.excitation.gamma}"
    )


def run(args: argparse.Namespace) -> int:
    from excitation_dist.config import ConfigError
    from excitation_dist.recipe.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"excitation-dist train: {exc}") from None

    if args.print_field:
        p = cfg.parallel
        value = {"gpus_per_node": p.gpus_per_node, "nodes": p.nodes, "world_size": p.world_size,
                 "backend": cfg.backend, "data_parallel": p.data_parallel,
                 "gradient_accumulation_steps": cfg.gradient_accumulation_steps}[args.print_field]
        print(value)
        return 0
    if args.dry_run:
        print(_layout(cfg))
        return 0

    try:
        backend = importlib.import_module(BACKENDS[cfg.backend])
    except ImportError as exc:
        raise SystemExit(
            f"excitation-dist train: backend '{cfg.backend}' cannot be imported ({exc}); "
            f"install it with: pip install -e '.[{cfg.backend}]'"
        ) from None
    try:
        if hasattr(backend, "validate"):
            backend.validate(cfg)
    except ConfigError as exc:
        raise SystemExit(f"excitation-dist train: {args.config}: {exc}") from None

    if not _launched():
        if cfg.parallel.nodes > 1:
            raise SystemExit(
                f"excitation-dist train: {args.config} asks for {cfg.parallel.nodes} nodes; launch it with "
                "launch/slurm/train.sbatch, launch/torchrun_multinode.sh or launch/deepspeed_hostfile.sh"
            )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(cfg.parallel.gpus_per_node),
               "-m", "excitation_dist.cli", "train", args.config, *args.overrides]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(f"excitation-dist train: launching {cfg.parallel.gpus_per_node} processes: {' '.join(cmd[1:])}", flush=True)
        os.execv(sys.executable, cmd)

    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.parallel.world_size:
        raise SystemExit(
            f"excitation-dist train: the launcher started {world} processes but the config asks for "
            f"parallel.nodes x parallel.gpus_per_node = {cfg.parallel.world_size}; make them agree"
        )
    if int(os.environ["RANK"]) == 0:
        print(_layout(cfg), flush=True)
    return int(backend.train(cfg) or 0)

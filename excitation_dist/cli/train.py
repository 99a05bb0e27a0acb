"""``excitation-dist train CONFIG [key.sub=value ...]``.

The config is read and checked first (:mod:`excitation_dist.recipe.preflight`:
keys, data, tokenizer and vocabulary, directories, the checkpoint lock, device
and backend), before any process starts; ``--dry-run`` stops there. Under a
launcher (torchrun, the deepspeed launcher, srun + torchrun) each rank runs the
configured backend's training loop, dies with its launcher
(:mod:`~excitation_dist.recipe.parent_watch`) and rank 0 holds the checkpoint
directory's lock (:mod:`~excitation_dist.recipe.run_lock`); a rank whose training returned
leaves without torch's C++ teardown (:mod:`~excitation_dist.recipe.rank_exit`). Started by hand on
one node, it takes the lock and re-launches itself (exec) under torchrun with
``parallel.gpus_per_node`` processes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from excitation_dist.recipe.parent_watch import exit_with_launcher

BACKENDS = {
    "deepspeed": "excitation_dist.recipe.backends.deepspeed",
    "fsdp2": "excitation_dist.recipe.backends.fsdp2",
    "megatron": "excitation_dist.recipe.backends.megatron",
    "torch": "excitation_dist.recipe.backends.torch",
}
_HELD: list = []  # the checkpoint-directory lock rank 0 holds for the rest of its life
_PRINTABLE = ("gpus_per_node", "nodes", "world_size", "backend", "data_parallel", "gradient_accumulation_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. schedule.train_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print the layout, and exit")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="one-node launch: restart all ranks up to N times after a failure, resuming from the "
                             "latest checkpoint (torchrun --max-restarts)")
    parser.add_argument("--print", choices=_PRINTABLE, dest="print_field",
                        help="print one derived value of the config (for launch scripts) and exit")


_FAST_PATHS_SAID = "EXCITATION_DIST_FAST_PATHS_SAID"


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


def _fail(config: str, problems: list[str]) -> SystemExit:
    """One line per problem, no traceback, exit code 1."""
    return SystemExit("\n".join(f"excitation-dist train: {config}: {p}" for p in problems))


def run(args: argparse.Namespace) -> int:
    from excitation_dist.config import ConfigError
    from excitation_dist.recipe import preflight
    from excitation_dist.recipe.backends import configs
    from excitation_dist.recipe.config import load_run_config
    from excitation_dist.recipe.run_lock import HELD_BY_LAUNCHER_ENV, CheckpointLocked, RunLock, held_by_our_launcher

    launched = _launched()
    if launched:
        exit_with_launcher()  # a rank never outlives its launcher (nor the deepspeed command)
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

    # device-aware fast paths (recipe/fast_paths.py): a GPU config on a machine without CUDA runs on CPU,
    # saying once (the launching process, or a rank 0 started directly) which settings fall back
    from excitation_dist.recipe import fast_paths

    fast = fast_paths.resolve(cfg)
    if fast.fallbacks and cfg.device == "cuda" and int(os.environ.get("RANK", 0)) == 0 \
            and not os.environ.get(_FAST_PATHS_SAID):
        print(f"excitation-dist train: {args.config}: " + fast_paths.report(cfg, fast), flush=True)
        os.environ[_FAST_PATHS_SAID] = "1"  # the ranks this process launches inherit it
    cfg = fast_paths.apply_device(cfg, fast)
    if cfg.backend == "deepspeed" and cfg.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, for the launcher and ranks
    rank = int(os.environ.get("RANK", 0))
    # Every rank checks (cheap, and each resolves model.vocab_size: auto); only the first reports.
    notes: list[str] = []  # said at resume by rank 0; here only by --dry-run
    problems = preflight.check_run(cfg, launching_locally=not launched and cfg.parallel.nodes == 1,
                                   check_lock=not launched, notes=notes)
    try:
        configs.validate(cfg)  # without torch: the launching process checks and execs torchrun in well under a second
    except ConfigError as exc:
        problems.append(str(exc))
    backend = None
    if launched and not problems:
        try:
            backend = importlib.import_module(BACKENDS[cfg.backend])
        except ImportError as exc:
            problems.append(f"backend: '{cfg.backend}' cannot be imported ({exc}); install it with: "
                            f"pip install -e '.[{cfg.backend}]'")
    if problems:
        if launched and rank != 0:
            raise SystemExit(1)
        raise _fail(args.config, problems)
    if args.dry_run:
        print(_layout(cfg))
        for note in notes:
            print(f"excitation-dist train: {args.config}: {note}")
        print(f"excitation-dist train: {args.config}: checked data, tokenizer (model.vocab_size "
              f"{cfg.model.vocab_size}), directories, the checkpoint to resume, device and backend: ready to launch")
        return 0

    if not launched:
        if cfg.parallel.nodes > 1:
            raise SystemExit(
                f"excitation-dist train: {args.config} asks for {cfg.parallel.nodes} nodes; launch it with "
                "launch/slurm/train.sbatch, launch/torchrun_multinode.sh or launch/deepspeed_hostfile.sh"
            )
        if cfg.checkpoint.dir is not None:
            # held across exec by torchrun (this pid) until the job ends, however it ends
            try:
                lock = RunLock(cfg.checkpoint.dir).acquire(inheritable=True)
            except CheckpointLocked as exc:
                raise _fail(args.config, [str(exc)]) from None
            os.environ[HELD_BY_LAUNCHER_ENV] = lock.holder.key
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(cfg.parallel.gpus_per_node), "--max-restarts", str(args.max_restarts),
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
    if rank == 0:
        if cfg.checkpoint.dir is not None and not held_by_our_launcher(cfg.checkpoint.dir):
            try:
                _HELD.append(RunLock(cfg.checkpoint.dir).acquire())  # released when this rank exits
            except CheckpointLocked as exc:
                raise _fail(args.config, [str(exc)]) from None
        print(_layout(cfg), flush=True)
    code = int(backend.train(cfg) or 0)
    from excitation_dist.recipe.rank_exit import leave

    leave(code)  # never returns: past torch's C++ teardown, which can abort a finished gloo rank (recipe/rank_exit.py)

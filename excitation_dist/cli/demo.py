"""``excitation-dist demo``: the embedded default job (see :mod:`excitation_dist.recipe.demo`)."""

from __future__ import annotations

import argparse

from excitation_dist.config import STRATEGIES, ConfigError, ExcitationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes (gloo ranks), default 2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run, default 300")
    parser.add_argument("--log-every", type=int, default=50, help="table row every N steps (default 50)")
    parser.add_argument("--strategy", default="zerosum", choices=STRATEGIES, help="Excitation strategy (default zerosum)")
    parser.add_argument("--gamma", type=float, default=1.0, help="Excitation gamma (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", help="write metrics.jsonl and TensorBoard events to LOG_DIR/{baseline,excited}")


def run(args: argparse.Namespace) -> int:
    from excitation_dist.recipe.demo import DemoConfig, run_demo

    if args.nproc < 1 or args.steps < 1 or args.log_every < 1:
        raise SystemExit("excitation-dist demo: --nproc, --steps and --log-every must be >= 1")
    try:
        excitation = ExcitationConfig(strategy=args.strategy, gamma=args.gamma)
    except ConfigError as exc:
        raise SystemExit(f"excitation-dist demo: {exc}") from None
    run_demo(DemoConfig(steps=args.steps, log_every=args.log_every, seed=args.seed, log_dir=args.log_dir,
                        excitation=excitation), args.nproc)
    return 0

"""The ``excitation-dist`` command line.

Subcommands register themselves in :data:`SUBCOMMANDS`: each entry maps a name
to a module path exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("excitation_dist.cli.demo", "train the tiny MoE on CPU in 2 processes: baseline vs Excitation"),
    "train": ("excitation_dist.cli.train", "train an MoE with Excitation from a YAML run config (backend torch, deepspeed or megatron)"),
    "report": ("excitation_dist.cli.report", "draw PNG plots of loss, expert utilization and multipliers from run directories"),
    "prepare-data": ("excitation_dist.cli.prepare_data", "tokenize jsonl or text (sentencepiece .model, Hugging Face tokenizer.json, or a newly trained sentencepiece model) into a Megatron indexed dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="excitation-dist",
        description="Excitation (arXiv 2602.21798) for distributed MoE training.",
    )
    # The deepspeed launcher passes --local_rank=N before the subcommand; ranks read LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option: `train CONFIG --dry-run a.b=1`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


"""Excitation's overhead in DeepSpeed training (CPU, gloo), printed as a table.

Per model size, one baseline engine B (no Excitation) and one engine A per
variant (folded / blend update path x ZeroSum / PositiveSum), identical models
on the same data, all in one run. Default layout: ZeRO-2 fp32 over 2 ranks with
EP 1, i.e. expert-data-parallel 2, and expert parameter groups of at most
three expert weight matrices (``split_params_into_different_moe_groups_for_optimizer``'s
``max_group_size``, as large MoE runs use it): ZeRO partitions each group in
two, so the boundary falls inside an expert weight (column "split"). With one
expert group (``--no-cut``) the halves of 2 x layers x 8 equal matrices fall on
an expert boundary and no expert is cut. Step times are interleaved A/B pairs, the whole comparison
repeated in rounds; memory is measured by the allocator and the RSS
high-water mark, not self-reported; collectives and host syncs added per
optimizer step are counted (see benchmarks/overhead_table.py).

    python benchmarks/deepspeed_overhead.py                       # 2 ranks, ZeRO-2, EP 1, small medium large
    python benchmarks/deepspeed_overhead.py --sizes tiny --repeats 5 --pairs 2   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # name: (d_model, d_ff per expert, layers, experts)
    "tiny": (16, 32, 2, 4),  # smoke tests only
    "small": (64, 128, 2, 8),
    "medium": (192, 768, 4, 8),
    "large": (384, 1536, 4, 8),  # about a second per step on 2 CPU cores
}


def _engine(size: str, ep_size: int, zero: int, micro: int, seq_len: int, cut: bool):
    import deepspeed
    import torch

    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from excitation_dist.recipe.backends.deepspeed import moe_param_groups

    d, ff, layers, experts = SIZES[size]
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig(seq_len=seq_len, d_model=d, n_layers=layers, n_heads=4, d_ff=ff,
                                num_experts=experts, top_k=2, experts="deepspeed", ep_size=ep_size,
                                capacity_factor=1.25))
    optimizer = torch.optim.AdamW(moe_param_groups(model, 0.1, 3 * d * ff if cut else None), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": zero}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _stepper(engine, corpus, micro: int, seq_len: int, rank: int):
    from excitation_dist.data import byte_batches

    state = {"step": 0}

    def step() -> None:
        batch = byte_batches(corpus, micro, seq_len, state["step"], rank=rank)
        state["step"] += 1
        engine.backward(engine(batch))
        engine.step()

    return step


def _measure(size: str, ep_size: int, zero: int, repeats: int, pairs: int, warmup: int, micro: int,
             seq_len: int, cut: bool) -> list[dict]:
    import torch
    import torch.distributed as dist

    import excitation_dist.deepspeed as exds
    from excitation_dist.data import embedded_corpus_bytes
    from overhead_table import check_update_path, compare, excitation_config, selected_variants

    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes(1_000_000)), dtype=torch.uint8)
    rank = dist.get_rank()
    baseline = _engine(size, ep_size, zero, micro, seq_len, cut)
    variants = {}
    for update, strategy in selected_variants():
        engine = _engine(size, ep_size, zero, micro, seq_len, cut)
        config = excitation_config(update, strategy)
        ex = exds.attach(engine, config) if config else None
        variants[f"{update}-{strategy}"] = (_stepper(engine, corpus, micro, seq_len, rank), ex)
    rows = compare(_stepper(baseline, corpus, micro, seq_len, rank), variants, repeats=repeats, pairs=pairs,
                   warmup=warmup)
    params = sum(p.numel() for p in baseline.module.parameters())
    for name, (_, ex) in variants.items():
        check_update_path(name, ex)
    return [dict(row, size=size, params=params) for row in rows.values()]


def _worker(sizes, ep_size, zero, repeats, pairs, warmup, micro, seq_len, cut):
    import logging

    from excitation_dist.deepspeed.compat import init_distributed

    init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    rows = []
    for s in sizes:
        rows += _measure(s, ep_size, zero, repeats, pairs, warmup, micro, seq_len, cut)
        import gc

        gc.collect()
    return rows


def main(argv=None) -> int:
    from overhead_table import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    add_timing_arguments(parser)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large"], choices=list(SIZES))
    parser.add_argument("--no-cut", dest="cut", action="store_false",
                        help="one expert parameter group (no max_group_size): partitions fall on expert boundaries")
    from overhead_table import add_variants_argument, select_variants

    add_variants_argument(parser)
    args = parser.parse_args(argv)
    select_variants(args.variants)

    from excitation_dist.testing import run_distributed
    from overhead_table import print_rounds, print_table

    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    rows = run_distributed(_worker, args.world_size, args.sizes, args.ep_size, args.zero, args.repeats, args.pairs,
                           args.warmup, args.micro, args.seq_len, args.cut, env=env, timeout=3600)[0]
    print_table(f"DeepSpeed ZeRO-{args.zero}, fp32, AdamW, {args.world_size} ranks (CPU, gloo), EP {args.ep_size} "
                f"(expert-data-parallel {args.world_size // args.ep_size}), micro-batch {args.micro} x {args.seq_len} "
                f"tokens, {'expert groups of <= 3 weight matrices' if args.cut else 'one expert group'}, {args.repeats} rounds x "
                f"{args.pairs} interleaved pairs per variant", rows)
    print("params per size: " + ", ".join(sorted({f"{r['size']} {r['params']:,}" for r in rows})))
    print_rounds(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""What Excitation costs on the plain PyTorch backend (CPU, gloo), measured side by side.

1. Training steps: per model size, one baseline B (DDP + AdamW, no Excitation)
   and one model A per variant (folded / blend update path x ZeroSum /
   PositiveSum), identical models on the same data, 2 processes. Experts are
   replicated (DDP): every rank steps every expert, no partition cuts one.
2. The optimizer step alone: AdamW on one stacked [experts, elements] fp32
   expert weight with and without Excitation's step hooks, one process: what
   Excitation adds where the optimizer step dominates.

Both: interleaved A/B pairs, the whole comparison repeated in rounds; memory
measured by the allocator and the RSS high-water mark, not self-reported;
collectives and host syncs added per optimizer step counted (see
benchmarks/overhead_table.py).

    python benchmarks/core_overhead.py                        # small medium large, then the optimizer step alone
    python benchmarks/core_overhead.py --sizes tiny --optimizer-elements 65536   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # name: (layers, d_model, experts, d_ff, seq, batch)
    "tiny": (2, 16, 4, 32, 16, 4),  # smoke tests only
    "small": (2, 64, 8, 128, 64, 8),
    "medium": (4, 256, 16, 512, 128, 8),
    "large": (8, 256, 16, 512, 128, 8),  # seconds per step on 2 CPU cores
}


def _model_step(size: str, strategy_update: tuple[str, str] | None, rank: int):
    import torch

    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from excitation_dist.torch import attach
    from overhead_table import excitation_config, lm_train_step

    layers, d, e, f, seq, b = SIZES[size]
    cfg = GPTMoEConfig(vocab_size=256, seq_len=seq, d_model=d, n_layers=layers, n_heads=4, d_ff=f,
                       num_experts=e, top_k=2)
    torch.manual_seed(0)
    model = GPTMoE(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    config = excitation_config(*strategy_update) if strategy_update else None
    ex = attach(ddp, opt, config) if config else None
    step = lm_train_step(ddp, opt, rank, b, seq)

    return step, ex, sum(p.numel() for p in model.parameters())


def _worker(sizes, repeats, pairs, warmup) -> list[dict]:
    import torch
    import torch.distributed as dist

    from overhead_table import compare_sizes

    torch.set_num_threads(1)
    rank = dist.get_rank()
    return compare_sizes(sizes, lambda size, variant: _model_step(size, variant, rank), repeats=repeats, pairs=pairs,
                         warmup=warmup)


def _optimizer_alone(elements: int, experts: int, repeats: int, pairs: int, warmup: int) -> list[dict]:
    """AdamW on one stacked fp32 expert weight, alone, with and without Excitation's
    step hooks. Counts: a quarter of the experts get no token (ZeroSum phi = 0),
    the rest distinct counts (PositiveSum: the least used has phi = 1)."""
    import torch

    from excitation_dist import Excitation, ExpertSegment
    from overhead_table import compare, excitation_config, selected_variants

    per_expert = elements // experts
    g = torch.Generator().manual_seed(0)
    init = torch.randn(experts, per_expert, generator=g)
    grad = torch.randn(experts, per_expert, generator=g)
    counts = torch.arange(experts, dtype=torch.int64) * 10
    counts[: experts // 4] = 0

    def make(config):
        w = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW([w], lr=1e-3)
        ex = None
        if config is not None:
            ex = Excitation(config, 1, experts, reduce=False)
            ex.set_segments(ExpertSegment(w, e * per_expert, (e + 1) * per_expert, 0, e) for e in range(experts))
            ex.hook_optimizer(opt)

        def step() -> None:
            w.grad = grad.clone()
            if ex is not None:
                ex.record(0, counts)
            opt.step()
            w.grad = None

        return step, ex

    baseline, _ = make(None)
    variants = {f"{u}-{s}": make(excitation_config(u, s)) for u, s in selected_variants()}
    result = compare(baseline, variants, repeats=repeats, pairs=pairs, warmup=warmup)
    return [dict(r, size=f"{elements // 2**20}M" if elements >= 2**20 else f"{elements // 2**10}k", params=elements)
            for r in result.values()]


def main(argv=None) -> int:
    from overhead_table import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    add_timing_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large"], choices=list(SIZES))
    parser.add_argument("--optimizer-elements", nargs="*", type=int, default=[2**21, 2**24],
                        help="expert elements of the optimizer-alone benchmark (none: skip it)")
    parser.add_argument("--optimizer-pairs", type=int, default=4)
    from overhead_table import add_variants_argument, select_variants

    add_variants_argument(parser)
    args = parser.parse_args(argv)
    select_variants(args.variants)

    import torch

    from excitation_dist.testing import run_distributed
    from overhead_table import print_rounds, print_table

    rows = run_distributed(_worker, args.nproc, args.sizes, args.repeats, args.pairs, args.warmup,
                           env={"OMP_NUM_THREADS": "1"}, timeout=3600)[0] if args.sizes else []
    if rows:
        print_table(f"Plain PyTorch backend: DDP + AdamW, {args.nproc} processes (CPU, gloo), experts replicated, "
                    f"{args.repeats} rounds x {args.pairs} interleaved pairs per variant", rows)
        print("params per size: " + ", ".join(sorted({f"{r['size']} {r['params']:,}" for r in rows})))
        print_rounds(rows)
    if args.optimizer_elements:
        torch.set_num_threads(1)
        alone = []
        for n in args.optimizer_elements:
            alone += _optimizer_alone(n, 16, args.repeats, args.optimizer_pairs, args.warmup)
        print()
        print_table(f"The optimizer step alone: AdamW on one stacked [16, n/16] fp32 expert weight, one process, "
                    f"one thread, {args.repeats} rounds x {args.optimizer_pairs} interleaved pairs; "
                    "size = expert elements", alone)
        print_rounds(alone)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

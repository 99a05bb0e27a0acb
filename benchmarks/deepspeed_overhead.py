"""Excitation's overhead in DeepSpeed training (CPU, gloo), printed as a table.

For each model size, two engines with identical models and data train in one
run, steps interleaved (A, B, A, B, ...) so that machine noise hits both alike:
A with Excitation (ZeroSum), B without. Reported per size:

- step time ratio A / B (median over steps, and median of per-pair ratios);
- collectives and bytes Excitation adds per optimizer step (profiler-measured:
  all collectives of A's step minus B's);
- peak transient snapshot bytes versus the expert parameter elements this rank
  owns (its slices of the fp32 ZeRO partitions).

    python benchmarks/deepspeed_overhead.py                  # 2 ranks, ZeRO-2, 2 sizes
    python benchmarks/deepspeed_overhead.py --world-size 4 --ep-size 2 --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # name: (d_model, d_ff per expert, layers, experts)
    "small": (64, 128, 2, 8),
    "medium": (192, 768, 4, 8),
    "large": (384, 1536, 4, 8),  # about a second per step on 2 CPU cores
}


def _engine(size: str, ep_size: int, zero: int, micro: int, seq_len: int):
    import deepspeed
    import torch

    from excitation_dist.deepspeed.model import GPTMoE, GPTMoEConfig, moe_param_groups

    d, ff, layers, experts = SIZES[size]
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig(seq_len=seq_len, d_model=d, n_layers=layers, n_heads=4, d_ff=ff,
                                num_experts=experts, top_k=2, ep_size=ep_size))
    optimizer = torch.optim.AdamW(moe_param_groups(model, 0.1), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": zero}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine, batch) -> None:
    engine.backward(engine(batch))
    engine.step()


def _measure(size: str, ep_size: int, zero: int, steps: int, warmup: int, micro: int, seq_len: int) -> dict:
    import torch
    import torch.distributed as dist

    import excitation_dist.deepspeed as exds
    from excitation_dist.data import byte_batches, embedded_corpus_bytes
    from excitation_dist.testing import count_collectives

    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes(1_000_000)), dtype=torch.uint8)
    with_ex = _engine(size, ep_size, zero, micro, seq_len)
    excitation = exds.attach(with_ex, {"strategy": "zerosum"})
    without = _engine(size, ep_size, zero, micro, seq_len)
    rank = dist.get_rank()

    times_a, times_b = [], []
    for step in range(warmup + steps):
        batch = byte_batches(corpus, micro, seq_len, step, rank=rank)
        order = [(with_ex, times_a), (without, times_b)] if step % 2 == 0 else [(without, times_b), (with_ex, times_a)]
        for engine, times in order:
            dist.barrier()
            t0 = time.perf_counter()
            _step(engine, batch)
            if step >= warmup:
                times.append(time.perf_counter() - t0)

    batch = byte_batches(corpus, micro, seq_len, 10**6, rank=rank)
    with count_collectives() as log_a:
        _step(with_ex, batch)
    with count_collectives() as log_b:
        _step(without, batch)
    from overhead_table import overhead_row

    params = sum(p.numel() for p in with_ex.module.parameters())
    return overhead_row(size, params, times_a, times_b, log_a, log_b, excitation)


def _worker(sizes, ep_size, zero, steps, warmup, micro, seq_len):
    import logging

    from excitation_dist.deepspeed.compat import init_distributed

    init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return [_measure(s, ep_size, zero, steps, warmup, micro, seq_len) for s in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES))
    args = parser.parse_args()

    from excitation_dist.testing import run_distributed
    from overhead_table import print_overhead_table

    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    results = run_distributed(_worker, args.world_size, args.sizes, args.ep_size, args.zero, args.steps, args.warmup,
                              args.micro, args.seq_len, env=env, timeout=1800)[0]
    print_overhead_table(f"DeepSpeed ZeRO-{args.zero}, fp32, {args.world_size} ranks (CPU, gloo), EP {args.ep_size}, "
                         f"micro-batch {args.micro} x {args.seq_len} tokens, {args.steps} interleaved steps per engine",
                         results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

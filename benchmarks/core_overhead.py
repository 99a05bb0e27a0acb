"""What Excitation costs, measured side by side in one run (plain PyTorch backend, CPU, gloo).

1. Step time with and without Excitation for growing MoE transformers, steps
   interleaved (baseline, excited, baseline, ...) so both see the same machine
   state; the ratio of medians is the overhead.
2. The counts path alone (record every layer, one all-reduce, multipliers) for
   up to 64 layers x 256 experts; collectives and bytes per step (profiler).
3. Transient snapshot memory against the expert parameter bytes the rank owns.
4. The update blending alone against the AdamW step it wraps, on up to 16M
   expert elements: what Excitation adds where the optimizer dominates a step.

    python benchmarks/core_overhead.py            # 2 processes
    python benchmarks/core_overhead.py --quick    # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from excitation_dist import Excitation
from excitation_dist.models import TinyMoEConfig, TinyMoETransformer, lm_loss
from excitation_dist.testing import count_collectives, run_distributed
from excitation_dist.torch import attach

SIZES = {  # name: (layers, d_model, experts, d_ff, seq, batch)
    "S": (2, 64, 8, 128, 64, 8),
    "M": (4, 256, 16, 512, 128, 8),
    "L": (8, 256, 16, 512, 128, 8),  # seconds per step on 2 CPU cores; ~2.5 GB per engine and rank
}


def _step_times(size: str, steps: int) -> dict:
    layers, d, e, f, seq, b = SIZES[size]
    cfg = TinyMoEConfig(vocab_size=256, seq_len=seq, d_model=d, n_layers=layers, n_heads=4, d_ff=f,
                        num_experts=e, top_k=2)
    runs = {}
    for name, strategy in (("baseline", None), ("excited", "zerosum")):
        torch.manual_seed(0)
        model = TinyMoETransformer(cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        ex = attach(ddp, opt, {"strategy": strategy}) if strategy else None
        runs[name] = (model, ddp, opt, ex)
    times = {"baseline": [], "excited": []}
    g = torch.Generator().manual_seed(dist.get_rank())
    for step in range(steps + 2):
        tokens = torch.randint(0, 256, (b, seq + 1), generator=g)
        order = list(runs.items()) if step % 2 == 0 else list(runs.items())[::-1]  # alternate who goes first
        for name, (model, ddp, opt, ex) in order:
            dist.barrier()
            t0 = time.perf_counter()
            loss, _ = lm_loss(ddp, 0.01, tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - t0)
    ex = runs["excited"][3]
    expert_bytes = sum((s.end - s.start) * s.tensor.element_size() for s in ex.segments)
    params = sum(p.numel() for p in runs["excited"][0].parameters())
    base, exc = statistics.median(times["baseline"]), statistics.median(times["excited"])
    return {"size": size, "params": params, "baseline_ms": 1e3 * base, "excited_ms": 1e3 * exc, "ratio": exc / base,
            "snapshot_peak_MB": ex.peak_snapshot_bytes / 2**20, "expert_params_MB": expert_bytes / 2**20}


def _counts_path(layers: int, experts: int, steps: int) -> dict:
    """record all layers (4 micro-batches), reduce once, compute multipliers."""
    ex = Excitation({"strategy": "zerosum"}, layers, experts)
    counts = torch.randint(0, 100, (layers, experts))
    times = []
    for step in range(steps + 2):
        with count_collectives() as log:
            t0 = time.perf_counter()
            for _micro in range(4):
                for layer in range(layers):
                    ex.record(layer, counts[layer])
            ex._finalize()  # the work the optimizer pre-hook does before snapshotting
            ex.end_step()
            elapsed = time.perf_counter() - t0
        if step >= 2:
            times.append(elapsed)
    return {"layers": layers, "experts": experts, "ms": 1e3 * statistics.median(times),
            "collectives": log.count(), "bytes": layers * experts * 8}


def _blend_vs_optimizer(experts: int, per_expert: int, steps: int) -> dict:
    """The update blending alone against the base optimizer step it wraps: AdamW
    on one stacked [experts, per_expert] fp32 weight, with and without
    Excitation's hooks (ZeroSum of random counts: every expert's phi != 1, so
    every element is snapshotted and blended), steps interleaved."""
    from excitation_dist import ExpertSegment

    g = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(experts, per_expert, generator=g)) for _ in range(2)]
    opts = [torch.optim.AdamW([w], lr=1e-3) for w in weights]
    ex = Excitation({"strategy": "zerosum"}, 1, experts, reduce=False)
    ex.set_segments(ExpertSegment(weights[1], e * per_expert, (e + 1) * per_expert, 0, e) for e in range(experts))
    ex.hook_optimizer(opts[1])
    times = {0: [], 1: []}
    for step in range(steps + 2):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=g)
        ex.record(0, torch.randint(1, 100, (experts,), generator=g))
        for i in ((0, 1) if step % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            opts[i].step()
            if step >= 2:
                times[i].append(time.perf_counter() - t0)
    base, excited = statistics.median(times[0]), statistics.median(times[1])
    return {"elements": experts * per_expert, "adamw_ms": 1e3 * base, "with_ms": 1e3 * excited,
            "added_ms": 1e3 * (excited - base), "ratio": excited / base, "snapshot_MB": ex.peak_snapshot_bytes / 2**20}


def _worker(quick: bool) -> list:
    torch.set_num_threads(1)
    sizes = ["S", "M"] if quick else list(SIZES)
    steps = 5 if quick else 20
    rows = [("step", _step_times(s, steps)) for s in sizes]
    grid = [(2, 8), (16, 64)] if quick else [(2, 8), (16, 64), (32, 128), (64, 256)]
    rows += [("counts", _counts_path(layers, experts, steps)) for layers, experts in grid]
    blends = [(8, 2**14), (16, 2**17)] if quick else [(8, 2**14), (16, 2**17), (32, 2**19)]
    rows += [("blend", _blend_vs_optimizer(e, n, steps)) for e, n in blends]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows = run_distributed(_worker, args.nproc, args.quick, timeout=3600)[0]
    print(f"\nStep time, plain PyTorch backend, {args.nproc} CPU processes (DDP, gloo), ZeroSum, medians of interleaved steps")
    print(f"{'size':>4} {'params':>11} {'baseline ms':>12} {'excited ms':>11} {'ratio':>7} {'snapshot peak MB':>17} {'expert params MB':>17}")
    for kind, r in rows:
        if kind == "step":
            print(f"{r['size']:>4} {r['params']:>11,} {r['baseline_ms']:>12.1f} {r['excited_ms']:>11.1f} {r['ratio']:>7.3f} "
                  f"{r['snapshot_peak_MB']:>17.2f} {r['expert_params_MB']:>17.2f}")
    print("\nCounts path per optimizer step (4 micro-batches recorded, one all-reduce, multipliers)")
    print(f"{'layers':>6} {'experts':>8} {'ms':>8} {'collectives':>12} {'bytes reduced':>14}")
    for kind, r in rows:
        if kind == "counts":
            print(f"{r['layers']:>6} {r['experts']:>8} {r['ms']:>8.3f} {r['collectives']:>12} {r['bytes']:>14,}")
    print("\nUpdate blending alone vs. the AdamW step it wraps (one stacked fp32 expert weight, every phi != 1)")
    print(f"{'elements':>11} {'AdamW ms':>9} {'+Excitation ms':>15} {'added ms':>9} {'ratio':>7} {'snapshot MB':>12}")
    for kind, r in rows:
        if kind == "blend":
            print(f"{r['elements']:>11,} {r['adamw_ms']:>9.2f} {r['with_ms']:>15.2f} {r['added_ms']:>9.2f} "
                  f"{r['ratio']:>7.3f} {r['snapshot_MB']:>12.1f}")


if __name__ == "__main__":
    main()

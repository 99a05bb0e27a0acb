"""The result rows and the table of the framework overhead benchmarks
(deepspeed_overhead.py, megatron_overhead.py)."""

from __future__ import annotations

import statistics

LEGEND = ("ratio: median step time with / without; pair: median of per-step-pair ratios; +coll/+bytes: collectives "
          "and bytes Excitation adds per optimizer step; snap B: peak transient snapshot bytes (max over ranks); "
          "owned el: expert parameter elements this rank steps (max over ranks)")


def overhead_row(size: str, params: int, times_with: list[float], times_without: list[float], log_with,
                 log_without, excitation) -> dict:
    """One size's results: interleaved step times (s) with and without Excitation,
    the collectives of one step of each (``count_collectives`` logs), and the
    controller's snapshot peak and owned expert elements (max over ranks; a
    collective, so call it on every rank)."""
    import torch
    import torch.distributed as dist

    L, E = excitation.num_layers, excitation.num_experts
    count_buffer = log_with.count("all_reduce", (L, E))
    maxima = torch.tensor([excitation.peak_snapshot_bytes, excitation.owned_expert_numel()], dtype=torch.float64)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return {
        "size": size,
        "params": params,
        "step_ms_without": 1000 * statistics.median(times_without),
        "step_ms_with": 1000 * statistics.median(times_with),
        "ratio": statistics.median(times_with) / statistics.median(times_without),
        "pair_ratio": statistics.median(a / b for a, b in zip(times_with, times_without)),
        "extra_collectives": len(log_with.calls) - len(log_without.calls),
        "count_allreduces": count_buffer,
        "extra_bytes": count_buffer * L * E * 8,  # int64 [L, E] counts
        "peak_snapshot_bytes": int(maxima[0]),
        "owned_expert_elements": int(maxima[1]),
    }


def print_overhead_table(title: str, results: list[dict], note: str = "") -> None:
    print(title)
    header = (f"{'size':<8}{'params':>10}{'ms w/o':>9}{'ms with':>9}{'ratio':>8}{'pair':>8}"
              f"{'+coll':>7}{'+bytes':>8}{'snap B':>11}{'owned el':>10}{'snap B/el':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        per_el = r["peak_snapshot_bytes"] / max(r["owned_expert_elements"], 1)
        print(f"{r['size']:<8}{r['params']:>10}{r['step_ms_without']:>9.1f}{r['step_ms_with']:>9.1f}"
              f"{r['ratio']:>8.3f}{r['pair_ratio']:>8.3f}{r['extra_collectives']:>7}{r['extra_bytes']:>8}"
              f"{r['peak_snapshot_bytes']:>11}{r['owned_expert_elements']:>10}{per_el:>10.2f}")
    print(note + LEGEND)

"""The table the framework overhead benchmarks print (deepspeed_overhead.py, megatron_overhead.py).

Each result row is a dict with: size, params, step_ms_without, step_ms_with,
ratio, pair_ratio, extra_collectives, extra_bytes, peak_snapshot_bytes,
owned_expert_elements.
"""

from __future__ import annotations

LEGEND = ("ratio: median step time with / without; pair: median of per-step-pair ratios; +coll/+bytes: collectives "
          "and bytes Excitation adds per optimizer step; snap B: peak transient snapshot bytes (max over ranks); "
          "owned el: expert parameter elements this rank steps (max over ranks)")


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

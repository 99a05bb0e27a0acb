"""The shared harness of the overhead benchmarks (core_overhead.py,
deepspeed_overhead.py, megatron_overhead.py): interleaved A/B step timing
repeated several times, allocator-measured transient memory, collectives and
host syncs added per step, and the result table.

Every benchmark builds one baseline engine B (no Excitation) and one engine A
per variant (update path x strategy), all identical models on the same data,
and calls :func:`compare`. Run it inside a ``torch.distributed`` worker (every
rank calls it; the step order is the same on all ranks).

Timing: ``repeats`` rounds; in each round every variant runs ``pairs`` step
pairs with B, alternating which engine goes first (A B, B A, ...), a barrier
before each step. A round's ratio for a variant is the median of its per-pair
ratios t(A) / t(B); the table reports min / median / max of those ratios over
the rounds (and the median over all pairs). Rank 0's clock.

Memory (one untimed step of each engine, max over ranks):
- ``rss``: the process's RSS high-water mark during the step minus its RSS
  before it (``malloc_trim`` first so freed heap does not hide new pages;
  ``/proc/self/clear_refs`` "5" resets ``VmHWM``); reported as A's minus B's.
- ``alloc``: the peak of torch's CPU allocator during the step, from the
  profiler's memory events (running sum of allocations and frees), minus its
  level at the start; A's minus B's.
- on CUDA: ``torch.cuda.max_memory_allocated`` during the step minus
  ``memory_allocated`` before it; A's minus B's.

Collectives (profiler: all of A's step minus all of B's; and the [L, E] count
all-reduces alone) and host syncs (``count_host_syncs``: A's minus B's,
ops that only A issued, max over ranks) from one more untimed step each.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

# (update path, strategy) pairs measured against the baseline. PositiveSum has rows with phi = 1
# (least-used experts), ZeroSum rows with phi = 0 (experts that received no token). "none-control" is
# the null control: a second engine built exactly like the baseline, without Excitation; its ratio is
# what two identical engines differ by in this run (the resolution of the comparison).
CONTROL = ("none", "control")
VARIANTS = [("folded", "zerosum"), ("folded", "positivesum"), ("blend", "zerosum"), ("blend", "positivesum"), CONTROL]
_VARIANTS_ENV = "EXCITATION_BENCH_VARIANTS"  # set by --variants, read in the worker processes


def add_variants_argument(parser) -> None:
    names = [f"{u}-{s}" for u, s in VARIANTS]
    parser.add_argument("--variants", nargs="+", default=names, choices=names,
                        help="which Excitation variants to time against the baseline (default: all)")


def select_variants(names: list[str]) -> None:
    """Called in the launching process: the workers inherit the choice."""
    os.environ[_VARIANTS_ENV] = ",".join(names)


def selected_variants() -> list[tuple[str, str]]:
    chosen = os.environ.get(_VARIANTS_ENV)
    return [v for v in VARIANTS if chosen is None or f"{v[0]}-{v[1]}" in chosen.split(",")]


def excitation_config(update: str, strategy: str) -> dict | None:
    """The Excitation config of a variant (None for the null control: no Excitation)."""
    if (update, strategy) == CONTROL:
        return None
    return {"strategy": strategy, "update": update}


def check_update_path(name: str, excitation) -> None:
    """The variant ran on the update path it names (the control has no Excitation)."""
    if excitation is None:
        assert name == "-".join(CONTROL), name
    else:
        assert excitation.update_path == name.split("-")[0], (name, excitation.update_path)


# ------------------------------------------------------------------ memory
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_extra_bytes(step: Callable[[], None]) -> int | None:
    """RSS high-water mark during ``step()`` minus RSS before it (Linux; None elsewhere)."""
    try:
        import gc

        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _proc_status_kb("VmRSS")
    except OSError:
        step()
        return None
    step()
    return 1024 * (_proc_status_kb("VmHWM") - before)


def profiled_step(step: Callable[[], None]) -> tuple[int, int, list]:
    """One profiled call of ``step()``: (peak of torch's CPU allocator during the
    step above its level at the start, the same within the optimizer steps
    (``Optimizer.step#...`` ranges, Excitation's hooks included) above the level
    at each one's start, the collectives issued as (name, shapes)). The
    allocator curve is the running sum of the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    ranges = sorted((e.start_ns(), e.end_ns()) for e in events if e.name().startswith("Optimizer.step#"))
    # innermost only: the base torch optimizer's steps (a wrapper such as DeepSpeed's ZeRO optimizer may be one too)
    ranges = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    level = peak = 0
    opt_peak, opt_base, current = 0, None, None
    for t, nbytes in memory:
        while ranges and ranges[0][1] < t:  # ranges that ended before this event
            ranges.pop(0)
            current = None
        if ranges and ranges[0][0] <= t and current is None:
            current, opt_base = ranges[0], level
        level += nbytes
        peak = max(peak, level)
        if current is not None:
            opt_peak = max(opt_peak, level - opt_base)
    collectives = [(e.name(), str(e.shapes())) for e in events
                   if e.name().startswith("gloo:") or e.name().startswith("nccl:")]
    return peak, opt_peak, collectives


def cuda_extra_bytes(step: Callable[[], None]) -> int | None:
    """torch.cuda.max_memory_allocated during ``step()`` minus memory_allocated before (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ------------------------------------------------------------------ timing
def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _timed(step: Callable[[], None]) -> float:
    import torch

    _barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@dataclass
class Timing:
    round_ratios: list[float]  # per round: median of that round's pair ratios
    pair_ratios: list[float]
    ms_with: float  # median step time of A
    ms_without: float  # median step time of B over the pairs with this A


def interleaved(baseline: Callable[[], None], variants: dict[str, Callable[[], None]], *, repeats: int, pairs: int,
                warmup: int) -> dict[str, Timing]:
    """Step times of each variant against the baseline, interleaved (see the module docstring)."""
    for _ in range(warmup):
        baseline()
        for step in variants.values():
            step()
    times = {name: ([], []) for name in variants}  # name -> (A times, B times), per pair
    rounds = {name: [] for name in variants}
    k = 0
    names = list(variants)
    for r in range(repeats):
        # the variants in a rotated order each round: whichever runs first in a round (caches, allocator, the
        # machine's frequency state) is a different one every time, not always the first one listed
        for name in names[r % len(names):] + names[: r % len(names)]:
            step = variants[name]
            ratios = []
            for _ in range(pairs):
                if k % 2 == 0:
                    ta = _timed(step)
                    tb = _timed(baseline)
                else:
                    tb = _timed(baseline)
                    ta = _timed(step)
                k += 1
                times[name][0].append(ta)
                times[name][1].append(tb)
                ratios.append(ta / tb)
            rounds[name].append(statistics.median(ratios))
    out = {}
    for name in variants:
        a, b = times[name]
        out[name] = Timing(rounds[name], [x / y for x, y in zip(a, b)], 1e3 * statistics.median(a),
                           1e3 * statistics.median(b))
    return out


# ------------------------------------------------------------ step costs
@dataclass
class StepCost:
    rss: int | None
    alloc: int
    opt_alloc: int
    cuda: int | None
    collectives: list  # (name, shapes)
    syncs: Counter


def step_cost(step: Callable[[], None]) -> StepCost:
    """Memory, collectives and host syncs of three (four on CUDA) untimed calls of ``step``."""
    from excitation_dist.testing.syncs import count_host_syncs

    rss = rss_extra_bytes(step)
    alloc, opt_alloc, collectives = profiled_step(step)
    _barrier()
    cuda = cuda_extra_bytes(step) if _cuda() else None
    with count_host_syncs() as syncs:
        step()
    _barrier()
    return StepCost(rss, alloc, opt_alloc, cuda, collectives, Counter(syncs))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def split_experts(excitation) -> int:
    """Experts (layer, expert) whose elements more than one rank steps: the
    ZeRO partitions / optimizer shards cut them."""
    import torch
    import torch.distributed as dist

    owned = torch.zeros(excitation.num_layers, excitation.num_experts, dtype=torch.int64)
    for s in excitation.segments:
        if s.end > s.start:
            owned[s.layer, s.expert] = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(owned)
    return int((owned >= 2).sum())


def compare(baseline: Callable[[], None], variants: dict[str, tuple[Callable[[], None], object]], *, repeats: int,
            pairs: int, warmup: int) -> dict[str, dict]:
    """Time, then measure the step costs of, every variant against the baseline.

    ``variants``: name -> (step function, its Excitation controller or None for the null control).
    Returns name -> result row (identical on every rank)."""
    timing = interleaved(baseline, {n: s for n, (s, _) in variants.items()}, repeats=repeats, pairs=pairs,
                         warmup=warmup)
    base = step_cost(baseline)
    rows = {}
    for name, (step, ex) in variants.items():
        cost = step_cost(step)
        added_syncs = cost.syncs - base.syncs
        count_reduces = 0
        if ex is not None:
            shape = str([ex.num_layers, ex.num_experts])
            count_reduces = sum(1 for n, shapes in cost.collectives if "all_reduce" in n and shape in shapes)
        mem = [cost.rss - base.rss if cost.rss is not None and base.rss is not None else float("nan"),
               cost.alloc - base.alloc, cost.opt_alloc - base.opt_alloc,
               cost.cuda - base.cuda if cost.cuda is not None else float("nan"),
               sum(added_syncs.values()), ex.peak_snapshot_bytes if ex else 0, ex.owned_expert_numel() if ex else 0]
        rss, alloc, opt_alloc, cuda, syncs, snap, owned = _max_over_ranks(mem)
        t = timing[name]
        rows[name] = {
            "variant": name, "path": ex.update_path if ex else "none", "ms_without": t.ms_without, "ms_with": t.ms_with,
            "round_ratios": t.round_ratios, "min": min(t.round_ratios), "median": statistics.median(t.round_ratios),
            "max": max(t.round_ratios), "pair_median": statistics.median(t.pair_ratios),
            "added_collectives": len(cost.collectives) - len(base.collectives), "count_reduces": count_reduces,
            "added_syncs": int(syncs), "added_sync_ops": dict(added_syncs), "rss_extra": rss, "alloc_extra": alloc, "opt_alloc_extra": opt_alloc,
            "cuda_extra": cuda, "self_reported_snapshot": int(snap), "owned_expert_elements": int(owned),
            "split_experts": split_experts(ex) if ex else 0,
        }
    return rows


# ------------------------------------------------------------------- table
LEGEND = """\
ratio min/med/max: step time with / without Excitation, min / median / max over the rounds (each round: median of
  its interleaved pair ratios); pairs: median over all pairs; ms: median step times (B: its pairs with this A)
+coll: collectives A's step issues beyond B's; cnt: [L, E] count all-reduces in A's step; +sync: host syncs added
+step / +opt: peak of torch's CPU allocator during A's whole step / during its base optimizer's steps (innermost
  Optimizer.step# ranges, Excitation's hooks included) above the level at its start, minus the same for B (profiler memory events; max over ranks)
(values below 1 MiB in bytes, e.g. 384B)
+rss: RSS high-water mark during A's step above RSS before it, minus the same for B (page-level, noisy)
snap: Excitation's self-reported peak snapshot bytes (for comparison); owned: expert elements the rank steps;
split: experts whose elements more than one rank steps (partitions cut them)"""


def _mb(x: float) -> str:
    if x != x:
        return "n/a"
    if abs(x) < 2**20:  # below a MiB: exact bytes
        return f"{int(x)}B" if x else "0"
    return f"{x / 2**20:.3f}"


def print_table(title: str, rows: list[dict], note: str = "") -> None:
    print(title)
    header = (f"{'size':<7}{'variant':<20}{'ms w/o':>8}{'ms with':>8}{'min':>7}{'med':>7}{'max':>7}{'pairs':>7}"
              f"{'+coll':>6}{'cnt':>4}{'+sync':>6}{'+step MB':>9}{'+opt MB':>9}{'+rss MB':>9}{'snap MB':>8}{'owned':>10}"
              f"{'split':>6}")
    if any(r["cuda_extra"] == r["cuda_extra"] for r in rows):
        header += f"{'+cuda MB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['size']:<7}{r['variant']:<20}{r['ms_without']:>8.1f}{r['ms_with']:>8.1f}{r['min']:>7.3f}"
                f"{r['median']:>7.3f}{r['max']:>7.3f}{r['pair_median']:>7.3f}{r['added_collectives']:>6}"
                f"{r['count_reduces']:>4}{r['added_syncs']:>6}{_mb(r['alloc_extra']):>9}{_mb(r['opt_alloc_extra']):>9}"
                f"{_mb(r['rss_extra']):>9}"
                f"{_mb(r['self_reported_snapshot']):>8}{r['owned_expert_elements']:>10}{r['split_experts']:>6}")
        if "+cuda" in header:
            line += f"{_mb(r['cuda_extra']):>9}"
        print(line)
        if r["added_sync_ops"]:
            print(f"{'':<7}  added host syncs: {r['added_sync_ops']}")
    print(note + LEGEND)


def print_rounds(rows: list[dict]) -> None:
    print("\nPer-round ratios (median of each round's pairs):")
    for r in rows:
        print(f"  {r['size']:<7}{r['variant']:<20}" + " ".join(f"{x:.3f}" for x in r["round_ratios"]))


@contextlib.contextmanager
def quiet_logs():
    import logging

    logging.getLogger("excitation_dist").setLevel(logging.ERROR)
    yield


def lm_train_step(model, optimizer, rank: int, batch: int, seq: int, vocab: int = 256):
    """One training step of a GPT-MoE on seeded random tokens (a different batch per step and rank)."""
    import torch

    state = {"step": 0}

    def step() -> None:
        g = torch.Generator().manual_seed(1000 * state["step"] + rank)
        state["step"] += 1
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        model(tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare_sizes(sizes, model_step, *, repeats: int, pairs: int, warmup: int) -> list[dict]:
    """Per model size: the baseline ``model_step(size, None)`` against every selected variant
    ``model_step(size, (update, strategy))`` (each returns (step, Excitation or None, params)),
    interleaved; the rows of :func:`compare`, with the size and the parameter count."""
    import gc

    rows = []
    for size in sizes:
        baseline, _, params = model_step(size, None)
        variants = {}
        for update, strategy in selected_variants():
            step, ex, _ = model_step(size, (update, strategy))
            variants[f"{update}-{strategy}"] = (step, ex)
        result = compare(baseline, variants, repeats=repeats, pairs=pairs, warmup=warmup)
        for name, (_, ex) in variants.items():
            check_update_path(name, ex)
        rows += [dict(r, size=size, params=params) for r in result.values()]
        del baseline, variants
        gc.collect()
    return rows


def add_timing_arguments(parser) -> None:
    """--repeats / --pairs / --warmup of the interleaved comparison (:func:`compare`), shared by the benchmarks."""
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the whole A/B comparison")
    parser.add_argument("--pairs", type=int, default=2, help="interleaved step pairs per variant per round")
    parser.add_argument("--warmup", type=int, default=2)

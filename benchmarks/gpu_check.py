"""Excitation on a GPU: no host syncs in its step path, and what it adds to a step.

On a machine with CUDA (one process, one GPU):

1. Host syncs. The base optimizer's step, which runs Excitation's pre/post
   step hooks (multipliers, the folded lr * phi update, the wait on the count
   all-reduce), runs under ``torch.cuda.set_sync_debug_mode("error")``: any
   synchronizing CUDA call in it raises. The same is done for the baseline's
   optimizer step (if the baseline's own optimizer syncs, the check says so
   instead of blaming Excitation). The whole training step (forward with
   Excitation's counting, backward, step) then runs under mode "warn", with
   and without Excitation: the number of sync warnings must be equal.
2. Step time: baseline (no Excitation) against the folded path (and the blend
   fallback, for reference), steps interleaved, the whole comparison repeated
   ``--repeats`` (>= 5) times; min / median / max of the per-round ratios.
3. Memory: ``torch.cuda.max_memory_allocated`` during one step, with and
   without Excitation (peak stats reset before the step).

Backends: plain PyTorch (GPTMoE with torch experts + torch AdamW), and DeepSpeed
ZeRO-2 fp32 (GPTMoE with deepspeed experts + torch AdamW, one rank over NCCL)
when DeepSpeed imports.
Writes the table to results/gpu_check.md. Without CUDA it says so on stderr
("gpu_check: NOT RUN: no GPU ...") and exits 3, so that a CI job cannot read a
machine without a GPU as a pass.

    python benchmarks/gpu_check.py                    # or: make gpu-check
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 3  # nothing was checked: distinct from a pass (0) and from a failed check (1)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


# ----------------------------------------------------------------- helpers
@contextlib.contextmanager
def sync_debug(mode: str):
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def guard_step(optimizer, log: list) -> None:
    """Run ``optimizer.step`` (and the step hooks it calls) under sync debug
    mode "error" while ``log`` holds ``[True]``; record the first error in it."""
    original = optimizer.step

    def step(*args, **kwargs):
        if not log or log[0] is not True:
            return original(*args, **kwargs)
        try:
            with sync_debug("error"):
                return original(*args, **kwargs)
        except RuntimeError as e:
            log[:] = [f"{type(e).__name__}: {str(e).splitlines()[0]}"]
            return original(*args, **kwargs)  # finish the step outside the guard

    optimizer.step = step


def sync_warnings(step) -> int:
    """Synchronizing CUDA calls in ``step()`` (sync debug mode "warn")."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            step()
        torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def peak_bytes(step) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------- backends
def torch_backend(args) -> tuple[dict, dict]:
    """(step functions by name, {name: (base optimizer, Excitation)})."""
    import torch

    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from excitation_dist.torch import attach

    cfg = GPTMoEConfig(vocab_size=256, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                       n_heads=8, d_ff=args.d_ff, num_experts=args.experts, top_k=2)
    steps, parts = {}, {}
    for name, update in (("none", None), ("folded", "folded"), ("blend", "blend")):
        torch.manual_seed(0)
        model = GPTMoE(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # foreach on CUDA: the folded path applies
        ex = attach(model, opt, {"strategy": "zerosum", "update": update}) if update else None
        state = {"i": 0}

        def step(model=model, opt=opt, state=state):
            g = torch.Generator().manual_seed(state["i"])
            state["i"] += 1
            tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).cuda(non_blocking=True)
            model(tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name], parts[name] = step, (opt, ex)
    return steps, parts


def deepspeed_backend(args) -> tuple[dict, dict]:
    import deepspeed
    import torch

    import excitation_dist.deepspeed as exds
    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from excitation_dist.recipe.backends.deepspeed import moe_param_groups

    steps, parts = {}, {}
    for name, update in (("none", None), ("folded", "folded"), ("blend", "blend")):
        torch.manual_seed(0)
        model = GPTMoE(GPTMoEConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=8,
                                    d_ff=args.d_ff, num_experts=args.experts, top_k=2, experts="deepspeed",
                                    ep_size=1, capacity_factor=1.25))
        opt = torch.optim.AdamW(moe_param_groups(model, 0.1), lr=1e-4)
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                  "steps_per_print": 10**9, "zero_optimization": {"stage": 2}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        ex = exds.attach(engine, {"strategy": "zerosum", "update": update}) if update else None
        state = {"i": 0}

        def step(engine=engine, state=state):
            g = torch.Generator().manual_seed(state["i"])
            state["i"] += 1
            batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).to(engine.device)
            engine.backward(engine(batch))
            engine.step()

        steps[name], parts[name] = step, (opt, ex)  # opt: the base torch optimizer ZeRO steps
    return steps, parts


def check(backend: str, steps: dict, parts: dict, args) -> list[dict]:
    for _ in range(args.warmup):  # lazy optimizer state, allocator warm-up
        for step in steps.values():
            step()
    guards = {}
    for name in ("none", "folded"):
        log = [True]
        guard_step(parts[name][0], log)
        steps[name]()
        guards[name] = "none raised" if log == [True] else log[0]
        log[:] = [False]
    warn_counts = {name: sync_warnings(steps[name]) for name in ("none", "folded", "blend")}
    memory = {name: peak_bytes(steps[name]) for name in ("none", "folded", "blend")}
    from overhead_table import interleaved  # the benchmarks' interleaved A/B timing (CUDA-synchronized)

    timing = interleaved(steps["none"], {n: steps[n] for n in ("folded", "blend")}, repeats=args.repeats,
                         pairs=args.pairs, warmup=0)
    rounds = {name: t.round_ratios for name, t in timing.items()}
    rows = []
    for name in ("folded", "blend"):
        ex = parts[name][1]
        r = rounds[name]
        rows.append({
            "backend": backend, "path": f"{name} ({ex.update_path})", "min": min(r), "median": statistics.median(r),
            "max": max(r), "rounds": r, "peak_without": memory["none"], "peak_with": memory[name],
            "sync_warnings_added": warn_counts[name] - warn_counts["none"],
            "error_mode": guards.get(name, "not checked (the blend path reads phi on the host once per step)"),
            "baseline_error_mode": guards["none"],
        })
    return rows


def table(rows: list[dict], args, device: str) -> str:
    lines = [
        "# GPU check: Excitation's step path on a GPU",
        "",
        f"Device: {device}. Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`.",
        f"Model: {args.layers} layers, d_model {args.d_model}, {args.experts} experts x d_ff {args.d_ff}, top-2, "
        f"batch {args.batch} x {args.seq_len} tokens, fp32, AdamW (foreach), ZeroSum. Step ratio: with / without "
        f"Excitation, {args.repeats} rounds x {args.pairs} interleaved pairs (min / median / max of the rounds). "
        "Peak: torch.cuda.max_memory_allocated during one step. Syncs: sync debug mode 'error' around the base "
        "optimizer's step (Excitation's hooks inside), and sync warnings of a whole step with minus without.",
        "",
        "| backend | path | ratio min | median | max | peak MiB without | peak MiB with | + MiB | "
        "+sync warnings (step) | error mode around the optimizer step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['path']} | {r['min']:.4f} | {r['median']:.4f} | {r['max']:.4f} | "
            f"{r['peak_without'] / 2**20:.1f} | {r['peak_with'] / 2**20:.1f} | "
            f"{(r['peak_with'] - r['peak_without']) / 2**20:.1f} | {r['sync_warnings_added']} | {r['error_mode']} "
            f"(baseline: {r['baseline_error_mode']}) |")
    lines += ["", "Per-round ratios:", ""]
    lines += [f"- {r['backend']} {r['path']}: " + ", ".join(f"{x:.4f}" for x in r["rounds"]) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=["torch", "deepspeed"], choices=["torch", "deepspeed"])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.md")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: NOT RUN: no GPU on this machine (torch.cuda.is_available() is False); nothing was "
              f"checked and {args.out} was not written. Run it on a CUDA machine.", file=sys.stderr)
        return NO_GPU_EXIT
    device = torch.cuda.get_device_name()
    rows = check("torch", *torch_backend(args), args) if "torch" in args.backends else []
    if "deepspeed" in args.backends:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            print(f"gpu_check: DeepSpeed not importable ({e}); torch backend only.")
        else:
            import torch.distributed as dist

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29513")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            from excitation_dist.deepspeed.compat import init_distributed

            init_distributed()
            rows += check("deepspeed ZeRO-2", *deepspeed_backend(args), args)
            dist.destroy_process_group()
    text = table(rows, args, device)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    bad = [r for r in rows if r["path"].startswith("folded") and
           (r["sync_warnings_added"] != 0 or r["error_mode"] != "none raised")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

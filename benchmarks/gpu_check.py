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
4. The optimizer step alone, at Qwen3-30B-A3B-like expert shapes, for each
   Adam-family optimizer importable (torch fused and foreach AdamW, Transformer
   Engine, apex and DeepSpeed FusedAdam), with one tensor per expert and with one
   flat partition: CUDA kernels launched per step (torch.profiler), sync debug
   mode "error" around the step, peak memory added, and the step-time ratio
   against a null control, interleaved.
5. Exactness of the folded step on the device, for each of those optimizers:
   a flat partition with dense gaps (ZeRO-style) and one tensor per expert,
   stepped with Excitation against the same optimizer with one parameter
   group per expert at lr * phi (its own kernel, no Excitation code): the path
   taken and the largest difference relative to the largest value. This is the
   first run of Transformer Engine's and apex's FusedAdam against the folded
   update's transcription of their formula and step counters.

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
    for name in ("none", "folded", "blend"):
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
            "error_mode": guards.get(name, "not checked"),
            "baseline_error_mode": guards["none"],
        })
    return rows


# ------------------------------------------------- the optimizer step alone
def fused_optimizers() -> dict:
    """name -> make(params) for every Adam-family optimizer importable here (fused ones first)."""
    import torch

    makers = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True),
    }
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam as TEFusedAdam

        makers["Transformer Engine FusedAdam"] = lambda ps: TEFusedAdam(ps, lr=1e-4, weight_decay=0.1)
    except Exception:  # not installed / not built for this GPU
        pass
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam

        makers["apex FusedAdam"] = lambda ps: ApexFusedAdam(ps, lr=1e-4, weight_decay=0.1)
    except Exception:
        pass
    if os.environ.get("GPU_CHECK_DEEPSPEED_FUSED_ADAM", "1") == "1":  # JIT-builds DeepSpeed's CUDA op (~1 min)
        try:
            from deepspeed.ops.adam import FusedAdam as DSFusedAdam

            makers["DeepSpeed FusedAdam"] = lambda ps: DSFusedAdam(ps, lr=1e-4, weight_decay=0.1, adam_w_mode=True)
        except Exception:
            pass
    return makers


def kernel_launches(step) -> int:
    """CUDA kernels launched by ``step()`` (torch.profiler's CUDA kernel events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def optimizer_step_rows(args) -> list[dict]:
    """Per layout (one tensor per expert; one flat partition) and optimizer: kernels launched,
    syncs under sync debug mode "error", peak memory added, and the step-time ratio against a
    null control (a second optimizer without Excitation), interleaved, >= 5 rounds."""
    import torch

    import step_ops
    from overhead_table import interleaved

    rows = []
    for name, make in fused_optimizers().items():
        for layout in ("per-expert", "flat"):
            variants = {}
            for variant, update in (("none", None), ("control", None), ("excited", "auto")):
                try:
                    prepare, opt, ex = step_ops._setup(
                        layout, args.step_layers, args.step_experts, "fused", update, rows=2 * args.step_ffn,
                        cols=args.step_hidden, device="cuda", make_optimizer=make)
                except Exception as e:  # an optimizer that cannot run here
                    print(f"gpu_check: {name} ({layout}) skipped: {type(e).__name__}: {e}")
                    break
                prepare()
                opt.step()

                def step(prepare=prepare, opt=opt):  # the same gradients every step: the step alone is timed
                    prepare(grads=False)
                    opt.step()

                variants[variant] = (step, opt, ex)
            if len(variants) < 3:
                continue
            launches = {v: kernel_launches(variants[v][0]) for v in variants}
            step_excited, opt_excited, ex = variants["excited"]
            log = [True]
            guard_step(opt_excited, log)
            step_excited()
            error_mode = "none raised" if log == [True] else log[0]
            log[:] = [False]
            memory = {v: peak_bytes(variants[v][0]) for v in ("none", "excited")}
            timing = interleaved(variants["none"][0], {"excited": step_excited, "control": variants["control"][0]},
                                 repeats=args.repeats, pairs=args.pairs, warmup=1)
            rows.append({"optimizer": name, "layout": layout, "path": ex.update_path,
                         "launches_none": launches["none"], "launches_excited": launches["excited"],
                         "error_mode": error_mode, "extra_mib": (memory["excited"] - memory["none"]) / 2**20,
                         "ratio": timing["excited"].round_ratios, "control": timing["control"].round_ratios})
            del variants
            torch.cuda.empty_cache()
    return rows


def exactness(make, device: str, layout: str, *, layers: int = 2, experts: int = 4, rows: int = 8, cols: int = 16,
              steps: int = 4, seed: int = 0) -> dict:
    """The folded step of ``make(params)`` against one parameter group per expert at lr * phi:
    {"path", "rel_error"} (largest |difference| / largest |value| over the steps)."""
    import torch

    from excitation_dist import Excitation, ExpertSegment, multipliers

    g = torch.Generator().manual_seed(seed)
    numel = rows * cols
    head, tail = (3 * cols, 2 * cols) if layout == "flat" else (0, 0)
    sizes = ([head] if head else []) + [numel] * (layers * experts) + ([tail] if tail else [])
    owner = ([None] if head else []) + [(i // experts, i % experts) for i in range(layers * experts)] + \
        ([None] if tail else [])
    init = torch.randn(sum(sizes), generator=g)
    data = torch.randn(steps, sum(sizes), generator=g).to(device)
    counts = torch.randint(0, 50, (steps, layers, experts), generator=g)
    counts[1, 0, 1] = 0
    pieces = [torch.nn.Parameter(t.clone().to(device)) for t in init.split(sizes)]
    reference = make([{"params": [p]} for p in pieces])
    base_lr = reference.param_groups[0]["lr"]
    if layout == "flat":
        excited_params = [torch.nn.Parameter(init.clone().to(device))]
        offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
        segments = [ExpertSegment(excited_params[0], offsets[i], offsets[i + 1], *o)
                    for i, o in enumerate(owner) if o is not None]
    else:
        excited_params = [torch.nn.Parameter(t.clone().to(device)) for t in init.split(sizes)]
        segments = [ExpertSegment(p, 0, numel, *o) for p, o in zip(excited_params, owner)]
    opt = make(excited_params)
    ex = Excitation({"strategy": "zerosum"}, layers, experts, reduce=False, device=device)
    ex.set_segments(segments)
    ex.hook_optimizer(opt)
    worst = 0.0
    for step in range(steps):
        phi = multipliers(counts[step], "zerosum")
        for group, o in zip(reference.param_groups, owner):
            group["lr"] = base_lr * (1.0 if o is None else float(phi[o]))
        for params, o in ((pieces, reference), (excited_params, opt)):
            o.zero_grad()
            x = torch.cat([p.reshape(-1) for p in params])
            (torch.sin(x * data[step]).sum() + 0.1 * (x**2).sum()).backward()
        for layer in range(layers):
            ex.record(layer, counts[step, layer].to(device))
        reference.step()
        opt.step()
        want = torch.cat([p.detach().reshape(-1) for p in pieces])
        got = torch.cat([p.detach().reshape(-1) for p in excited_params])
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    ex.remove_hooks()
    return {"path": ex.update_path, "rel_error": worst}


def exactness_rows(makers: dict, device: str) -> list[dict]:
    rows = []
    for name, make in makers.items():
        for layout in ("flat", "per-expert"):
            try:
                rows.append({"optimizer": name, "layout": layout, **exactness(make, device, layout)})
            except Exception as e:  # reported, not hidden: a failure here is a finding
                rows.append({"optimizer": name, "layout": layout, "path": f"error: {type(e).__name__}: {e}",
                             "rel_error": float("nan")})
    return rows


EXACT_TOLERANCE = 1e-4  # float32, 4 steps; a formula or step-counter mismatch is orders of magnitude larger


def exactness_table(rows: list[dict]) -> str:
    lines = ["", "## Exactness of the folded step against per-expert learning rates", "",
             "Each optimizer with one parameter group per expert at lr * phi (its own kernel) against the same "
             "optimizer with Excitation, 4 steps, ZeroSum, an expert at phi = 0; 2 layers x 4 experts of [8, 16] "
             f"fp32. Pass: path folded and relative error <= {EXACT_TOLERANCE:g}.", "",
             "| optimizer | layout | path | max rel. error | pass |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ok = r["path"] == "folded" and r["rel_error"] <= EXACT_TOLERANCE
        lines.append(f"| {r['optimizer']} | {r['layout']} | {r['path']} | {r['rel_error']:.2e} | "
                     f"{'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def step_table(rows: list[dict], args) -> str:
    lines = [
        "",
        "## The optimizer step alone",
        "",
        f"{args.step_layers} MoE layers x {args.step_experts} local experts x 2 weights of "
        f"[{2 * args.step_ffn}, {args.step_hidden}] fp32 (Qwen3-30B-A3B-like: hidden {args.step_hidden}, expert "
        f"ffn {args.step_ffn}), plus one dense tensor; per-expert: one tensor per expert weight, flat: one "
        "partition. Launches: CUDA kernels in one step (torch.profiler). Ratio: step time with Excitation / "
        f"without, and a null control (a second optimizer without it), {args.repeats} interleaved rounds "
        "(min / median / max).",
        "",
        "| optimizer | layout | path | kernels without | kernels with | error mode (step) | + MiB | ratio min / "
        "median / max | null control min / median / max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = " / ".join(f"{f(r['ratio']):.4f}" for f in (min, statistics.median, max))
        control = " / ".join(f"{f(r['control']):.4f}" for f in (min, statistics.median, max))
        lines.append(f"| {r['optimizer']} | {r['layout']} | {r['path']} | {r['launches_none']} | "
                     f"{r['launches_excited']} | {r['error_mode']} | {r['extra_mib']:.1f} | {ratio} | {control} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--step-layers", type=int, default=4, help="the optimizer-step section: MoE layers")
    p.add_argument("--step-experts", type=int, default=32, help="... local experts per layer")
    p.add_argument("--step-hidden", type=int, default=2048, help="... hidden size")
    p.add_argument("--step-ffn", type=int, default=768, help="... expert ffn size")
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
    step_rows = optimizer_step_rows(args)
    exact_rows = exactness_rows(fused_optimizers(), "cuda")
    text = table(rows, args, device) + step_table(step_rows, args) + exactness_table(exact_rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    bad = [r for r in rows if r["path"].startswith("folded") and
           (r["sync_warnings_added"] != 0 or r["error_mode"] != "none raised")]
    bad += [r for r in step_rows if r["error_mode"] != "none raised"]
    bad += [r for r in exact_rows if not (r["path"] == "folded" and r["rel_error"] <= EXACT_TOLERANCE)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

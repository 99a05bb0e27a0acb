"""GPT-MoE language modeling on the embedded corpus through the real training
path (``excitation-dist train``), at tuned learning rates.

Two stages, one command:

1. sweep: every (load-balancing setting, strategy) over a log-spaced grid of peak
   learning rates (min_lr = lr / 10, the config's cosine schedule) with the
   selection seeds (default: seed 0);
2. confirm: each (balancing, strategy) at its own best learning rate (lowest final
   validation loss, mean over the selection seeds) with fresh report seeds
   (default 1..5) that took no part in choosing it. Best-vs-best and the paired
   differences to the baseline (same report seeds) come from stage 2 only. The
   best is taken over every learning rate of the cell in runs.csv that all the
   selection seeds ran, not only over ``--lrs``: a command that adds refined
   points between grid points confirms the cell's best over the whole grid.

``--report-at LRS`` skips both choices: the report seeds train at those learning
rates (the baseline at a strategy's chosen lr for the same-lr check, or a
strategy at the baseline's lr: Excitation switched on without retuning).

With ``--split`` giving the test split a share (e.g. ``96,2,2``: Megatron's
``--split``, the recipe's ``data.split``) every run also reports its loss on the
test split after the last step, and the report quotes that test loss: the
validation loss chooses the learning rate, the test tokens never took part in
the choice. Without it the report quotes the validation loss (the default split
``98,2,0`` has no test split).

    python -m excitation_dist.experiments.lm_sweep --out results/lm_sweep

Every run is a separate ``train`` process (one process, ``parallel.gpus_per_node=1``
by default). Writes runs.csv (final validation loss and expert metrics of every
run), curves.csv (training loss every 50 steps and validation loss at every
evaluation), sweep.csv, best.csv, tables.md and PNGs. Runs already in runs.csv
with the same config hash are reused; ``--strategies``, ``--balancing``,
``--lrs``, ``--select-seeds`` and ``--report-seeds`` rerun one cell.

Load-balancing settings (``--balancing``): ``aux:C`` trains with the
load-balancing loss at coefficient C (``aux:0`` without it); ``bias`` is
auxiliary-loss-free balancing (DeepSeek-V3's per-expert router bias,
``model.moe.expert_bias``) without the loss; ``bias+aux:C`` both.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from excitation_dist.experiments import plots
from excitation_dist.experiments.stats import (best_lr, config_hash, curves_at_best_lr, fmt_ci, fmt_diff, fmt_p, fnum,
                                               mean_ci, paired_full, read_csv, write_csv)
from excitation_dist.recipe.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["none", "zerosum", "positivesum", "expdiff", "inverted", "random", "global"]
CODE_VERSION = 3  # bump when a change alters what a run computes (invalidates the cache); 3: one GPT-MoE for torch and DeepSpeed


def parse_balancing(spec: str) -> tuple[float, bool]:
    """``aux:C`` -> (C, False); ``bias`` -> (0, True); ``bias+aux:C`` -> (C, True)."""
    aux, bias = 0.0, False
    for part in spec.split("+"):
        if part == "bias":
            bias = True
        elif part.startswith("aux:"):
            aux = float(part[4:])
        else:
            raise argparse.ArgumentTypeError(f"unknown load-balancing setting {spec!r}: use aux:C, bias or bias+aux:C")
    return aux, bias


def setting_name(aux: float | str, bias: bool | str) -> str:
    aux = float(aux)
    bias = str(bias) in ("1", "True", "true")
    if bias:
        return "aux-free bias" + (f" + aux loss {aux:g}" if aux else "")
    return f"aux loss {aux:g}"


def _mean_over_last(records: list[dict], key: str, n: int) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][-n:]
    return statistics.mean(values) if values else float("nan")


def run_config(args, balancing: tuple[float, bool], strategy: str, lr: float, seed: int, stage: str) -> dict:
    aux, bias = balancing
    cfg = {"config": Path(args.config).name, "steps": args.steps, "aux": aux, "expert_bias": int(bias),
           "strategy": strategy,
           "gamma": args.gamma, "lr": lr, "seed": seed, "procs": args.procs, "eval_steps": args.eval_steps,
           "overrides": " ".join(args.overrides), "code_version": CODE_VERSION}
    if args.evals != 6:  # evaluations per run (the default, 6, is left out of the hash: earlier rows stay valid)
        cfg["evals"] = args.evals
    if args.split:  # data.split (the config's when not given, left out of the hash: earlier rows stay valid)
        cfg["split"] = args.split
    cfg["hash"] = config_hash(cfg)
    cfg["stage"] = stage
    return cfg


def earlier_sweep(args, old: dict[str, dict], cell: tuple) -> list[dict]:
    """The cell's selection runs already in runs.csv at learning rates outside ``args.lrs`` (an earlier grid, or
    refined points), where every selection seed ran them: a refined grid is chosen over the whole grid, not over
    the points of the command that added it."""
    lrs = {fnum(r["lr"]) for r in old.values()} - set(args.lrs)
    out = []
    for lr in sorted(lrs):
        rows = [old.get(run_config(args, cell[0], cell[1], lr, s, "sweep")["hash"]) for s in args.select_seeds]
        if all(rows):
            out += rows
    return out


def _train(args, cfg: dict) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="lm_sweep_") as tmp:
        overrides = [f"excitation.strategy={cfg['strategy']}", f"excitation.gamma={cfg['gamma']}",
                     f"model.moe.aux_loss_coef={cfg['aux']}", f"model.moe.expert_bias={bool(cfg['expert_bias'])}",
                     f"seed={1000 + cfg['seed']}",
                     f"optimizer.lr={cfg['lr']}", f"optimizer.min_lr={cfg['lr'] / 10}",
                     f"parallel.gpus_per_node={cfg['procs']}",
                     f"schedule.train_steps={cfg['steps']}", f"schedule.eval_interval={max(1, cfg['steps'] // int(cfg.get('evals', 6)))}",
                     f"schedule.eval_steps={cfg['eval_steps']}", "logging.interval=1", f"logging.dir={tmp}",
                     "checkpoint.dir=null", *([f"data.split={cfg['split']}"] if cfg.get("split") else []),
                     *args.overrides]
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if cfg["procs"] == 1:  # one rank: skip the torchrun relaunch (same training path, one process less)
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        for attempt in range(3):
            if cfg["procs"] == 1:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    env["MASTER_PORT"] = str(sock.getsockname()[1])
            proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", args.config, *overrides],
                                  capture_output=True, text=True, env=env)
            if proc.returncode == 0:
                break
            print(f"run {cfg['hash']} attempt {attempt + 1} failed (exit {proc.returncode}):\n"
                  f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}", flush=True)
        else:
            raise SystemExit(f"run {cfg} failed 3 times")
        records = read_metrics(Path(tmp))
    vals = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    n = max(1, cfg["steps"] // 10)  # expert metrics: mean over the last 10% of steps
    tests = [r["test_loss"] for r in records if isinstance(r.get("test_loss"), (int, float))]
    row = {**cfg, "val_loss": vals[-1]["val_loss"] if vals else float("nan"),
           "test_loss": tests[-1] if tests else float("nan"),
           "train_loss_last10pct": _mean_over_last(records, "loss", n),
           "overload_last10pct": _mean_over_last(records, "excitation/overload_factor", n),
           "dead_experts_last10pct": _mean_over_last(records, "excitation/dead_experts", n),
           "entropy_last10pct": _mean_over_last(records, "excitation/entropy", n),
           "seconds": round(time.perf_counter() - t0, 1)}
    losses = [r for r in records if isinstance(r.get("loss"), (int, float))]
    curve = []
    for start in range(0, len(losses), 50):
        chunk = losses[start : start + 50]
        curve.append({"hash": cfg["hash"], "step": chunk[-1]["step"], "train_loss": statistics.mean(c["loss"] for c in chunk),
                      "val_loss": ""})
    curve += [{"hash": cfg["hash"], "step": v["step"], "train_loss": "", "val_loss": v["val_loss"]} for v in vals]
    return row, curve


def parser() -> argparse.ArgumentParser:
    """The command line (``plan`` parses its commands with it to compute the config hashes of their runs)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu_torch.yaml"))
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (x 16 x 64 tokens with the tiny configs)")
    p.add_argument("--strategies", type=lambda s: s.split(","), default=["none", "zerosum", "positivesum", "global"])
    p.add_argument("--balancing", type=lambda s: [parse_balancing(x) for x in s.split(",")],
                   default=[(0.01, False), (0.0, False), (0.0, True)],
                   help="load-balancing settings: aux:C (loss coefficient C), bias (aux-loss-free), bias+aux:C")
    p.add_argument("--aux-coefs", type=lambda s: [(float(x), False) for x in s.split(",")], dest="balancing",
                   help="shorthand for --balancing aux:C1,aux:C2,...")
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 2.2e-3, 4.6e-3, 1e-2, 2.2e-2])
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--select-seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0])
    p.add_argument("--report-seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 3, 4, 5])
    p.add_argument("--procs", type=int, default=1, help="training processes per run (parallel.gpus_per_node)")
    p.add_argument("--eval-steps", type=int, default=32)
    p.add_argument("--split", default=None, help="data.split for every run (Megatron's --split: training, validation, "
                   "test shares); a test share makes the report quote test loss (default: the config's, 98,2,0)")
    p.add_argument("--evals", type=int, default=6, help="validation evaluations per run (every steps/evals steps); "
                   "the convergence criterion needs several in the last 20%% of steps")
    p.add_argument("--report-at", type=lambda s: [float(x) for x in s.split(",")], default=None, metavar="LRS",
                   help="no sweep: train the report seeds at these learning rates (the same-lr check, or a method at "
                   "another method's chosen lr)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (each a separate process)")
    p.add_argument("--report-only", action="store_true", help="tables and plots from runs.csv, no training")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    old = {r["hash"]: r for r in read_csv(args.out / "runs.csv")}
    old_curves = read_csv(args.out / "curves.csv")
    new_rows: list[dict] = []
    new_curves: list[dict] = []
    stats = {"reused": 0, "run": 0}
    lock = threading.Lock()

    def ensure(cfg: dict) -> dict:
        with lock:
            if cfg["hash"] in old:
                stats["reused"] += 1
                return old[cfg["hash"]]
        if args.report_only:
            return {}
        row, curve = _train(args, cfg)
        with lock:  # runs.csv and curves.csv are rewritten after every run, so a stopped sweep keeps what it trained
            stats["run"] += 1
            new_rows.append(row)
            new_curves.extend(curve)
            old[cfg["hash"]] = row
            write_csv(args.out / "runs.csv", list(old.values()))
            write_csv(args.out / "curves.csv", old_curves + new_curves)
            print(f"[{stats['run']} run, {stats['reused']} reused] {cfg['stage']} "
              f"{setting_name(cfg['aux'], cfg['expert_bias'])} {cfg['strategy']:>11} "
              f"lr {cfg['lr']:g} seed {cfg['seed']}: val loss {row['val_loss']:.4f}, overload "
                  f"{row['overload_last10pct']:.2f}, dead {row['dead_experts_last10pct']:.2f} ({row['seconds']:.0f} s)",
                  flush=True)
        return row

    chosen = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # runs start in submission order
        cells = [(balancing, strategy) for balancing in args.balancing for strategy in args.strategies]
        if args.report_at:  # no choice: the report seeds at the given lrs
            chosen = {cell: list(args.report_at) for cell in cells}
        else:
            sweep = {cell: [pool.submit(ensure, run_config(args, cell[0], cell[1], lr, s, "sweep"))  # stage 1
                            for lr in args.lrs for s in args.select_seeds] for cell in cells}
            for cell, futures in sweep.items():
                sweep_rows = [r for r in (f.result() for f in futures) if r] + earlier_sweep(args, old, cell)
                if sweep_rows:
                    chosen[cell] = [best_lr(sweep_rows, "val_loss", higher_is_better=False)[0]]
        # stage 2: seed-major, so that a stopped run leaves every cell with as many seeds
        confirm = [pool.submit(ensure, run_config(args, cell[0], cell[1], lr, s, "confirm"))
                   for s in args.report_seeds for cell, lrs in chosen.items() for lr in lrs]
        for f in confirm:
            f.result()
    if not args.report_only:  # a report-only pass trains nothing: keep the record of the last training pass
        (args.out / "last_invocation.txt").write_text(
            f"{stats['run']} runs trained, {stats['reused']} reused from runs.csv by config hash\n")
    report(args)
    return 0


def report_metric(runs: list[dict], report_seeds) -> str:
    """What the report quotes: ``test_loss`` where every run of the report seeds has one (a split with a test
    share), else ``val_loss``."""
    rows = [r for r in runs if int(r["seed"]) in set(report_seeds)]
    return "test_loss" if rows and all(fnum(r.get("test_loss")) == fnum(r.get("test_loss")) for r in rows) \
        else "val_loss"


def report(args) -> None:
    runs = [r for r in read_csv(args.out / "runs.csv")]
    for r in runs:
        r["setting"] = setting_name(r["aux"], r.get("expert_bias", 0))
    curves = read_csv(args.out / "curves.csv")
    select = set(args.select_seeds)
    report_seeds = set(args.report_seeds) & {int(r["seed"]) for r in runs}  # the report seeds actually run
    metric = report_metric(runs, report_seeds)
    quoted = "test" if metric == "test_loss" else "validation"
    methods = [m for m in STRATEGIES if any(r["strategy"] == m for r in runs)]
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    sweep, best = [], []
    for setting in settings:
        base = None
        for m in methods:
            rows = [r for r in runs if r["setting"] == setting and r["strategy"] == m]
            sel = [r for r in rows if int(r["seed"]) in select]
            if not sel:
                continue
            for lr in sorted({fnum(r["lr"]) for r in sel}):
                at = [fnum(r["val_loss"]) for r in sel if fnum(r["lr"]) == lr]
                mm, lo, hi = mean_ci(at)
                sweep.append({"setting": setting, "strategy": m, "lr": lr, "seeds": len(at), "val_mean": mm,
                              "val_lo": lo, "val_hi": hi})
            lr, edge = best_lr(sel, "val_loss", higher_is_better=False)
            at = [r for r in rows if fnum(r["lr"]) == lr and int(r["seed"]) in report_seeds]
            if not at:
                continue
            loss = {int(r["seed"]): fnum(r[metric]) for r in at}
            if m == "none":
                base = loss
            vm, vlo, vhi = mean_ci(list(loss.values()))
            pr = paired_full(loss, base) if base is not None and m != "none" else None
            entry = {"setting": setting, "strategy": m, "best_lr": lr, "lr_at_grid_edge": int(edge), "seeds": len(at),
                     "test_mean": vm, "test_lo": vlo, "test_hi": vhi,
                     "diff_vs_baseline": pr["diff"] if pr else float("nan"), "diff_lo": pr["lo"] if pr else float("nan"),
                     "diff_hi": pr["hi"] if pr else float("nan"), "p_t": pr["p_t"] if pr else float("nan"),
                     "p_sign_flip": pr["p_flip"] if pr else float("nan")}
            for key in ("overload_last10pct", "dead_experts_last10pct", "entropy_last10pct"):
                km, klo, khi = mean_ci([fnum(r[key]) for r in at])
                entry.update({key: km, f"{key}_lo": klo, f"{key}_hi": khi})
            best.append(entry)
    write_csv(args.out / "sweep.csv", sweep)
    write_csv(args.out / "best.csv", best)

    lines = ["# GPT-MoE (tiny, plain-PyTorch backend) at tuned learning rates", ""]
    inv = args.out / "last_invocation.txt"
    if inv.is_file():
        lines += [f"Last invocation: {inv.read_text().strip()}", ""]
    lines += [f"Learning rate chosen on seed(s) {sorted(select)} (lowest final validation loss); the numbers below "
              f"are from seeds {sorted(report_seeds)} at that learning rate, which took no part in the choice. "
              + ("Test loss (nats/byte; the test split, which no choice read), " if quoted == "test"
                 else "Validation loss (nats/byte), ")
              + "mean [95% CI]; paired difference to the baseline (negative = lower "
              "loss = better) with its two-sided paired t-test p and exact sign-flip p, both unadjusted: the "
              "verdicts (Holm over every comparison of results/README.md) are made by "
              "`python -m excitation_dist.experiments.page`; overload = max over layers of (max tokens of one expert / mean tokens per expert) "
              "in a step; dead = experts with no token in a step, summed over layers; both averaged over the last "
              "10% of steps.", "",
              f"| balancing | method | best lr | seeds | {quoted} loss, nats/byte [95% CI] | minus baseline [95% CI] | "
              "p (t) | p (sign-flip) | overload | dead experts / step | entropy |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in best:
        pr = {"n": 1, "diff": b["diff_vs_baseline"], "lo": b["diff_lo"], "hi": b["diff_hi"]}
        lr = f"{b['best_lr']:g}" + (" (edge)" if b["lr_at_grid_edge"] else "")
        lines.append(f"| {b['setting']} | {b['strategy']} | {lr} | {b['seeds']} | "
                     f"{fmt_ci(b['test_mean'], b['test_lo'], b['test_hi'], 1, 3)} | "
                     f"{fmt_diff(pr, 1, 3) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_p(b['p_t']) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_p(b['p_sign_flip']) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_ci(b['overload_last10pct'], b['overload_last10pct_lo'], b['overload_last10pct_hi'], 1, 2)} | "
                     f"{fmt_ci(b['dead_experts_last10pct'], b['dead_experts_last10pct_lo'], b['dead_experts_last10pct_hi'], 1, 2)} | "
                     f"{b['entropy_last10pct']:.3f} |")
    lines += ["", f"Learning-rate sweep: final validation loss (nats/byte), seed(s) {sorted(select)}.", ""]
    for setting in settings:
        lrs = sorted({r["lr"] for r in sweep if r["setting"] == setting})
        lines += [f"**{setting}**", "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "| --- |" + " --- |" * len(lrs)]
        for m in methods:
            cells = [next((f"{r['val_mean']:.3f}" for r in sweep if r["setting"] == setting and r["strategy"] == m
                           and r["lr"] == lr), "") for lr in lrs]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    (args.out / "tables.md").write_text("\n".join(lines) + "\n")
    if not best:
        return
    finite = [r["val_mean"] for r in sweep if r["val_mean"] == r["val_mean"]]
    lo_y = min(finite) - 0.05
    plots.sweep_plot(args.out / "lr_sweep.png", sweep, settings, methods, "final validation loss (nats/byte)",
                     ylim=(lo_y, min(max(finite), lo_y + 3.0) + 0.05),
                     title=f"GPT-MoE: learning-rate sweep (seed(s) {sorted(select)})")
    lo_b = min(b["test_lo"] if b["test_lo"] == b["test_lo"] else b["test_mean"] for b in best)
    hi_b = max(b["test_hi"] if b["test_hi"] == b["test_hi"] else b["test_mean"] for b in best)
    pad = 0.1 * (hi_b - lo_b + 1e-3)
    plots.best_plot(args.out / "best_vs_best.png", best, settings, methods, f"{quoted} loss (nats/byte)",
                    ylim=(lo_b - pad, hi_b + pad), diff_label="minus baseline, nats/byte (negative = better)",
                    title=f"GPT-MoE: each method at its best lr, seeds {sorted(report_seeds)} (mean, 95% CI)")
    rows = [{"setting": r["setting"], "strategy": r["strategy"], "step": int(c["step"]),
             "train_loss": fnum(c["train_loss"]), "val_loss": fnum(c["val_loss"])}
            for r, c in curves_at_best_lr(runs, curves, best, setting_of=lambda r: r["setting"],
                                          keep=lambda r: int(r["seed"]) in report_seeds)]
    base_val: dict[tuple, list[float]] = {}  # the baseline's validation loss per (setting, step), over report seeds
    for r in rows:
        if r["strategy"] == "none" and r["val_loss"] == r["val_loss"]:
            base_val.setdefault((r["setting"], r["step"]), []).append(r["val_loss"])
    for r in rows:  # averaged per step by the plot: mean(method) - mean(baseline) over the report seeds
        base = base_val.get((r["setting"], r["step"]))
        r["val_minus_base"] = r["val_loss"] - statistics.mean(base) if base and r["val_loss"] == r["val_loss"] else float("nan")
    plots.curves_plot(args.out / "training_curves.png", rows, settings, methods, x_key="step",
                      panels=[("train_loss", "training loss, nats/byte (50-step mean)", 1, (lo_b - 0.3, 3.5), False),
                              ("val_loss", "validation loss (nats/byte)", 1, (lo_b - 0.3, 3.5), False),
                              ("val_minus_base", "val loss minus baseline (nats/byte)", 1, None, False)],
                      own_y=("val_minus_base",),
                      title="GPT-MoE: training curves at each method's best lr (mean over report seeds)",
                      xlabel="optimizer step")
    print((args.out / "tables.md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())

"""GPT-MoE language modeling on the embedded corpus through the real training
path (``excitation-dist train``): Excitation strategies and the paper's
controls at equal tokens, with and without the load-balancing loss, and a
gamma sweep. Every run is a separate ``train`` process with its own seed.

    python -m excitation_dist.experiments.lm_sweep --out results/lm_sweep
    python -m excitation_dist.experiments.lm_sweep --out results/lm_sweep --config configs/tiny_cpu.yaml  # deepspeed

Writes runs.csv (final validation loss and expert metrics of every run),
summary.csv (mean and std over seeds) and lm_sweep.png.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

from excitation_dist.recipe.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["none", "zerosum", "positivesum", "expdiff", "inverted", "random", "global"]


def _runs(args) -> list[dict]:
    runs = []
    for aux in args.aux_coefs:
        for strategy in args.strategies:
            for seed in range(args.seeds):
                runs.append({"group": f"aux={aux}", "strategy": strategy, "gamma": 1.0, "aux": aux, "seed": seed})
    for gamma in args.gammas:
        for seed in range(args.seeds):
            runs.append({"group": "gamma sweep", "strategy": "positivesum", "gamma": gamma, "aux": args.aux_coefs[0],
                         "seed": seed})
    return runs


def _final(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else float("nan")


def _mean_over_last(records: list[dict], key: str, n: int = 20) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][-n:]
    return statistics.mean(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu_torch.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--strategies", type=lambda s: s.split(","), default=STRATEGIES)
    p.add_argument("--aux-coefs", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.0])
    p.add_argument("--gammas", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 2.0],
                   help="PositiveSum gamma sweep (\"\" for none)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = _runs(args)
    for i, run in enumerate(runs, 1):
        name = f"{run['strategy']}_g{run['gamma']}_aux{run['aux']}_s{run['seed']}"
        log_dir = args.out / "runs" / name
        overrides = [f"excitation.strategy={run['strategy']}", f"excitation.gamma={run['gamma']}",
                     f"model.moe.aux_loss_coef={run['aux']}", f"seed={1000 + run['seed']}",
                     f"schedule.train_steps={args.steps}", f"schedule.eval_interval={args.steps}",
                     "schedule.eval_steps=16", "logging.interval=1", f"logging.dir={log_dir}",
                     "checkpoint.dir=null", *args.overrides]
        t0 = time.perf_counter()
        if not (log_dir / "metrics.jsonl").is_file():
            proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", args.config, *overrides],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"run {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = read_metrics(log_dir)
        row = {**run, "val_loss": _final(records, "val_loss"), "train_loss_last20": _mean_over_last(records, "loss"),
               "overload_last20": _mean_over_last(records, "excitation/overload_factor"),
               "dead_experts_last20": _mean_over_last(records, "excitation/dead_experts"),
               "entropy_last20": _mean_over_last(records, "excitation/entropy"),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"[{i}/{len(runs)}] {run['group']:>11} {run['strategy']:>11} gamma {run['gamma']} seed {run['seed']}: "
              f"val loss {row['val_loss']:.4f}, overload {row['overload_last20']:.2f}, dead {row['dead_experts_last20']:.2f}",
              flush=True)

    with open(args.out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["strategy"], r["gamma"]), []).append(r)
    summary = []
    for (group, strategy, gamma), members in groups.items():
        entry = {"group": group, "strategy": strategy, "gamma": gamma, "seeds": len(members)}
        for key in ("val_loss", "overload_last20", "dead_experts_last20", "entropy_last20"):
            vals = [m[key] for m in members]
            entry[f"{key}_mean"] = statistics.mean(vals)
            entry[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary.append(entry)
    with open(args.out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    _plot(args.out / "lm_sweep.png", summary)
    for e in summary:
        print(f"{e['group']:>11} {e['strategy']:>11} gamma {e['gamma']}: val loss {e['val_loss_mean']:.4f} "
              f"± {e['val_loss_std']:.4f}, overload {e['overload_last20_mean']:.2f}, dead {e['dead_experts_last20_mean']:.2f}")
    return 0


def _plot(path: Path, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(e["group"] for e in summary))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        members = [e for e in summary if e["group"] == group]
        labels = [e["strategy"] if group != "gamma sweep" else f"gamma {e['gamma']}" for e in members]
        ax.bar(range(len(members)), [e["val_loss_mean"] for e in members],
               yerr=[e["val_loss_std"] for e in members], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(members)), labels, rotation=45, ha="right")
        lo = min(e["val_loss_mean"] - e["val_loss_std"] for e in members)
        hi = max(e["val_loss_mean"] + e["val_loss_std"] for e in members)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(group)
        ax.set_ylabel("validation loss (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's Micro-MoE and "structural confusion" experiments, on a real image
dataset that ships with scikit-learn (8x8 handwritten digits, 1797 images).

Micro-MoE: an MLP whose hidden layers keep only their Top-K activations; every
hidden unit is an expert (its incoming weights and bias are the expert's
parameters), so ~90% sparsity means K = 13 of 128 units per sample.

    python -m excitation_dist.experiments.micro_moe micro --out results/micro_moe
    python -m excitation_dist.experiments.micro_moe depth --out results/structural_confusion

Each writes runs.csv (one row per run), summary.csv (mean and standard deviation
over seeds) and a PNG with error bars.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from excitation_dist.torch import ExpertSlice, attach, report_expert_counts


class TopKLinear(nn.Module):
    """Linear + ReLU keeping only each sample's top-k units; unit e is expert e."""

    def __init__(self, d_in: int, d_out: int, k: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.k = k
        self.num_experts = d_out

    def excitation_expert_slices(self):
        d_in = self.linear.in_features
        for e in range(self.num_experts):
            yield ExpertSlice(self.linear.weight, e, e * d_in, (e + 1) * d_in)
            yield ExpertSlice(self.linear.bias, e, e, e + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        top = h.topk(self.k, dim=-1)
        report_expert_counts(self, top.indices)
        return torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values))


class MicroMoE(nn.Module):
    def __init__(self, d_in: int, classes: int, depth: int, width: int, k: int, residual: bool = False) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(TopKLinear(a, b, k) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(width, classes)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.hidden):
            y = layer(x)
            x = x + y if self.residual and i > 0 else y
        return self.head(x)


def digits(seed: int = 0):
    """Standardized 8x8 digits, a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.2, random_state=seed,
                                              stratify=data.target)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return (as_t((x_tr - mean) / std, torch.float32), as_t(y_tr, torch.long),
            as_t((x_te - mean) / std, torch.float32), as_t(y_te, torch.long))


@dataclass
class Run:
    experiment: str
    optimizer: str
    batch_size: int
    strategy: str
    depth: int
    seed: int
    test_accuracy: float = 0.0
    final_train_loss: float = 0.0
    dead_units: float = 0.0
    seconds: float = 0.0


def train_one(run: Run, data, *, width: int, k: int, epochs: int, lr: dict[str, float], gamma: float = 1.0) -> Run:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(run.seed)
    model = MicroMoE(x_tr.shape[1], 10, run.depth, width, k)
    opt = (torch.optim.SGD(model.parameters(), lr=lr["sgd"]) if run.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr["adam"]))
    excitation = attach(model, opt, {"strategy": run.strategy, "gamma": gamma})
    g = torch.Generator().manual_seed(run.seed)
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=g)
        for start in range(0, len(order), run.batch_size):
            idx = order[start : start + run.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    run.seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        run.test_accuracy = (model(x_te).argmax(-1) == y_te).float().mean().item()
    run.final_train_loss = loss.item()
    run.dead_units = float((excitation.last_counts_LE == 0).sum())
    return run


def _summarize(runs: list[Run], keys: tuple[str, ...]) -> list[dict]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(getattr(r, k) for k in keys), []).append(r)
    rows = []
    for key, members in groups.items():
        acc = [m.test_accuracy for m in members]
        rows.append({**dict(zip(keys, key)), "seeds": len(members), "test_accuracy_mean": statistics.mean(acc),
                     "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "seconds_mean": statistics.mean(m.seconds for m in members)})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, summary: list[dict], group_keys: tuple[str, str], title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({r["strategy"] for r in summary}, key=["none", "zerosum", "positivesum"].index)
    groups = sorted({tuple(r[k] for k in group_keys) for r in summary})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4.2))
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        vals = [next(r for r in summary if tuple(r[k] for k in group_keys) == g and r["strategy"] == strategy)
                for g in groups]
        xs = [j + (i - (len(strategies) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [100 * v["test_accuracy_mean"] for v in vals], width, yerr=[100 * v["test_accuracy_std"] for v in vals],
               capsize=3, label="baseline" if strategy == "none" else strategy)
    ax.set_xticks(range(len(groups)), ["\n".join(str(x) for x in g) for g in groups])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["micro", "depth"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--k", type=int, default=13, help="units kept per layer (13 of 128 = ~90%% sparsity)")
    p.add_argument("--strategies", default="none,zerosum,positivesum")
    p.add_argument("--depths", default="4,8,12,16", help="depths for the structural-confusion sweep")
    p.add_argument("--batch-sizes", default="512,16")
    p.add_argument("--optimizers", default="sgd,adam")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    args.out.mkdir(parents=True, exist_ok=True)
    data = digits()
    strategies = args.strategies.split(",")
    lr = {"sgd": 0.1, "adam": 1e-3}
    if args.experiment == "micro":
        grid = itertools.product(args.optimizers.split(","), [int(b) for b in args.batch_sizes.split(",")],
                                 strategies, range(args.seeds))
        runs = [Run("micro_moe", o, b, s, 4, seed) for o, b, s, seed in grid]
        keys = ("optimizer", "batch_size", "strategy")
    else:
        grid = itertools.product([int(d) for d in args.depths.split(",")], strategies, range(args.seeds))
        runs = [Run("structural_confusion", "sgd", 128, s, d, seed) for d, s, seed in grid]
        keys = ("depth", "strategy")
    for i, run in enumerate(runs, 1):
        train_one(run, data, width=args.width, k=args.k, epochs=args.epochs, lr=lr)
        print(f"[{i}/{len(runs)}] {run.optimizer} batch {run.batch_size} depth {run.depth} {run.strategy:>11} "
              f"seed {run.seed}: test accuracy {100 * run.test_accuracy:.2f}% ({run.seconds:.1f} s)", flush=True)
    _write_csv(args.out / "runs.csv", [asdict(r) for r in runs])
    summary = _summarize(runs, keys)
    _write_csv(args.out / "summary.csv", summary)
    if args.experiment == "micro":
        _plot(args.out / "micro_moe.png", summary, ("optimizer", "batch_size"),
              f"Micro-MoE on digits: 4 x {args.width} units, top-{args.k}", "optimizer / batch size")
    else:
        _plot(args.out / "structural_confusion.png", summary, ("depth",),
              f"Deep Top-{args.k} MLP without residuals (SGD, batch 128)", "depth (hidden layers)")
    for row in summary:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's Micro-MoE and "structural confusion" experiments at tuned learning
rates, on a real image dataset that ships with scikit-learn (8x8 handwritten
digits, 1797 images; CIFAR-10 ships in no package this project can install).

Micro-MoE: an MLP whose hidden layers keep only their Top-K activations; every
hidden unit is an expert (its incoming weights and bias are the expert's
parameters), so ~90% sparsity means K = 13 of 128 units per sample.

Every (setting, method) pair is swept over a log-spaced learning-rate grid and
several seeds. Each method's learning rate is chosen on the validation split:
the highest mean validation accuracy over the selection seeds 5-7 where those
ran over the setting's whole grid, else over the report seeds 0-4 themselves
(``stats.split_choice``); the test accuracy of the report seeds 0-4 is read at
that learning rate only afterwards, and compared with the baseline's, each at its
own chosen learning rate, as paired differences over the same seeds (same
initialization, same data order) with a 95% Student-t interval.

    python -m excitation_dist.experiments.micro_moe micro --out results/micro_moe
    python -m excitation_dist.experiments.micro_moe depth --out results/structural_confusion
    python -m excitation_dist.experiments.micro_moe report --out results/micro_moe   # tables/plots only

Each writes runs.csv (one row per run), curves.csv (per-epoch training loss and
validation accuracy of every run), sweep.csv, best.csv, tables.md and three
PNGs. Runs already in runs.csv with the same config hash are reused (tables.md
says how many); ``--seeds``/``--seed-list``, ``--strategies``, ``--lrs`` and
``--settings``/``--depths`` rerun a single cell.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from excitation_dist.experiments import plots
from excitation_dist.experiments.stats import (REPORT_SEEDS, SELECT_SEEDS, config_hash, curves_at_best_lr, fmt_ci,
                                               fmt_diff, fmt_p, fnum, mean_ci, of_seeds, paired_full, read_csv,
                                               seeds_label, split_choice, write_csv)
from excitation_dist.torch import ExpertSlice, attach, report_expert_counts

CODE_VERSION = 2  # bump when a change alters what a run computes (invalidates the cache)
METHODS = ["none", "zerosum", "positivesum", "expdiff", "global", "inverted", "random"]


def log_grid(lo: float, hi: float, per_decade: int) -> list[float]:
    """Log-spaced learning rates from lo to hi, per_decade points per decade, 2 significant digits."""
    n = round(math.log10(hi / lo) * per_decade)
    return [float(f"{lo * 10 ** (i / per_decade):.2g}") for i in range(n + 1)]


LR_GRIDS = {  # log-spaced; chosen with 1-seed pilots to span "barely moves" to "diverges" for the baseline
    ("sgd", 512): log_grid(0.032, 10, 4),
    ("sgd", 128): log_grid(0.01, 10, 3),
    ("sgd", 16): log_grid(0.0022, 1, 3),
    ("adam", 512): log_grid(1e-4, 0.1, 3),
    ("adam", 16): log_grid(1e-5, 1e-2, 3),
}


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

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)
        top = h.topk(self.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values)), top.indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, idx = self.route(x)
        report_expert_counts(self, idx)
        return y


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


def digits():
    """Standardized 8x8 digits; fixed stratified splits: 20% test, then 20% of
    the rest as validation (1149 train / 288 validation / 360 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_rest, x_te, y_rest, y_te = train_test_split(data.data, data.target, test_size=0.2, random_state=0,
                                                  stratify=data.target)
    x_tr, x_va, y_tr, y_va = train_test_split(x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return {"train": (f(x_tr), i(y_tr)), "val": (f(x_va), i(y_va)), "test": (f(x_te), i(y_te))}


@torch.no_grad()
def routing_metrics(model: MicroMoE, x: torch.Tensor) -> tuple[float, float]:
    """Dead units and overload of the trained model on ``x`` (the validation set).

    dead: units (experts) never among any sample's top-k, summed over layers.
    overload: per layer, max over units of the samples a unit processes divided
    by the mean over units (1 = perfectly even), averaged over layers.
    """
    was = model.training
    model.eval()
    dead, overload = 0.0, []
    h = x
    for i, layer in enumerate(model.hidden):
        y, idx = layer.route(h)
        counts = torch.bincount(idx.reshape(-1), minlength=layer.num_experts).float()
        dead += float((counts == 0).sum())
        overload.append(float(counts.max() / counts.mean()))
        h = h + y if model.residual and i > 0 else y
    model.train(was)
    return dead, sum(overload) / len(overload)


@torch.no_grad()
def accuracy(model: nn.Module, split) -> float:
    was = model.training
    model.eval()
    x, y = split
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def train_one(cfg: dict, data) -> tuple[dict, list[dict]]:
    """One run; returns its result row and its per-epoch curve rows."""
    x_tr, y_tr = data["train"]
    torch.manual_seed(cfg["seed"])
    model = MicroMoE(x_tr.shape[1], 10, cfg["depth"], cfg["width"], cfg["k"])
    opt = (torch.optim.SGD(model.parameters(), lr=cfg["lr"]) if cfg["optimizer"] == "sgd"
           else torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    attach(model, opt, {"strategy": cfg["strategy"], "gamma": cfg["gamma"]})
    g = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    curve, diverged, last_loss = [], False, float("nan")
    for epoch in range(1, cfg["epochs"] + 1):
        order = torch.randperm(len(x_tr), generator=g)
        total, n = 0.0, 0
        for start in range(0, len(order), cfg["batch_size"]):
            idx = order[start : start + cfg["batch_size"]]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item() * len(idx)
            n += len(idx)
        if diverged:
            break
        last_loss = total / n
        curve.append({"hash": cfg["hash"], "epoch": epoch, "train_loss": last_loss,
                      "val_accuracy": accuracy(model, data["val"])})
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    dead, overload = routing_metrics(model, data["val"][0]) if finite else (float("nan"), float("nan"))
    row = {**cfg, "diverged": int(diverged or not finite),
           "val_accuracy": accuracy(model, data["val"]) if finite else 0.1,
           "test_accuracy": accuracy(model, data["test"]) if finite else 0.1,
           "final_train_loss": last_loss if not diverged else float("nan"),
           "dead_units": dead, "overload": overload, "seconds": round(time.perf_counter() - t0, 3)}
    return row, curve


def _configs(args) -> list[dict]:
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    if args.experiment == "micro":
        cells = [(f"{o} batch {b}", o, int(b), 4) for o, b in (s.split(":") for s in args.settings.split(","))]
    else:
        cells = [(f"depth {d}", "sgd", args.depth_batch, int(d)) for d in args.depths.split(",")]
    cfgs = []
    for setting, opt, batch, depth in cells:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else LR_GRIDS[(opt, batch)]
        for strategy in args.strategies.split(","):
            for lr in lrs:
                for seed in seeds:
                    cfg = {"experiment": args.experiment, "setting": setting, "optimizer": opt, "batch_size": batch,
                           "depth": depth, "strategy": strategy, "lr": lr, "seed": seed, "epochs": args.epochs,
                           "width": args.width, "k": args.k, "gamma": args.gamma, "code_version": CODE_VERSION}
                    cfg["hash"] = config_hash(cfg)
                    cfgs.append(cfg)
    return cfgs


def run_grid(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    old = {r["hash"]: r for r in read_csv(args.out / "runs.csv")}
    old_curves = read_csv(args.out / "curves.csv")
    cfgs = _configs(args)
    todo = [c for c in cfgs if c["hash"] not in old]
    print(f"{len(cfgs)} runs in the grid: {len(cfgs) - len(todo)} reused from runs.csv (same config hash), "
          f"{len(todo)} to run", flush=True)
    data = digits()
    new_rows, new_curves = [], []
    t0 = time.perf_counter()
    for i, cfg in enumerate(todo, 1):
        row, curve = train_one(cfg, data)
        new_rows.append(row)
        new_curves.extend(curve)
        print(f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {cfg['setting']} {cfg['strategy']:>11} "
              f"lr {cfg['lr']:g} seed {cfg['seed']}: val {100 * row['val_accuracy']:.1f}% "
              f"test {100 * row['test_accuracy']:.1f}%{' DIVERGED' if row['diverged'] else ''}", flush=True)
        if i % 50 == 0 or i == len(todo):  # checkpoint the raw outputs
            done = {r["hash"] for r in new_rows}
            write_csv(args.out / "runs.csv", list(old.values()) + new_rows)
            write_csv(args.out / "curves.csv", [c for c in old_curves if c["hash"] not in done] + new_curves)
    (args.out / "last_invocation.txt").write_text(
        f"grid of {len(cfgs)} runs: {len(cfgs) - len(todo)} reused from runs.csv by config hash, {len(todo)} run\n")


def report(out: Path, title: str, chance: float = 0.10, select=SELECT_SEEDS, report_seeds=REPORT_SEEDS) -> None:
    """Tables and plots from runs.csv / curves.csv alone: per setting, the lrs are chosen on the validation
    accuracy of ``select`` where those seeds ran the setting's whole grid, else of ``report_seeds``; test
    accuracy, differences and routing are read on ``report_seeds``."""
    runs = read_csv(out / "runs.csv")
    curves = read_csv(out / "curves.csv")
    first = {}
    for r in runs:
        first.setdefault(r["setting"], (r["optimizer"] != "sgd", -int(r["batch_size"]), int(r["depth"])))
    settings = sorted(first, key=first.get)  # SGD before Adam, large batch first, shallow first
    methods = [m for m in METHODS if any(r["strategy"] == m for r in runs)]
    sweep, best, chosen_on = [], [], {}
    for s in settings:
        base_seeds = None
        by_method = {m: [r for r in runs if r["setting"] == s and r["strategy"] == m] for m in methods}
        by_method = {m: rows for m, rows in by_method.items() if rows}
        split, chosen = split_choice(by_method, "val_accuracy", select, report_seeds)
        on = select if split else report_seeds
        chosen_on[s] = seeds_label(on)
        for m in methods:
            if m not in chosen:
                continue
            rows = of_seeds(by_method[m], report_seeds)
            for lr in sorted({fnum(r["lr"]) for r in rows}):
                sel = of_seeds([r for r in by_method[m] if fnum(r["lr"]) == lr], on)
                at = [r for r in rows if fnum(r["lr"]) == lr]
                vm, vlo, vhi = mean_ci([fnum(r["val_accuracy"]) for r in sel])
                tm, _, _ = mean_ci([fnum(r["test_accuracy"]) for r in at])
                sweep.append({"setting": s, "strategy": m, "lr": lr, "val_seeds": chosen_on[s], "seeds": len(sel),
                              "val_mean": vm, "val_lo": vlo, "val_hi": vhi, "test_seeds": seeds_label(report_seeds),
                              "test_mean": tm, "diverged": sum(int(r["diverged"]) for r in sel)})
            lr, edge = chosen[m]
            sel = of_seeds([r for r in by_method[m] if fnum(r["lr"]) == lr], on)
            at = [r for r in rows if fnum(r["lr"]) == lr]
            acc = {int(r["seed"]): fnum(r["test_accuracy"]) for r in at}
            if m == "none":
                base_seeds = acc
            tm, tlo, thi = mean_ci(list(acc.values()))
            dm, dlo, dhi = mean_ci([fnum(r["dead_units"]) for r in at])
            om, olo, ohi = mean_ci([fnum(r["overload"]) for r in at])
            p = paired_full(acc, base_seeds) if base_seeds is not None and m != "none" else None
            best.append({"setting": s, "strategy": m, "best_lr": lr, "lr_at_grid_edge": int(edge),
                         "lr_chosen_on_seeds": chosen_on[s], "seeds": len(at),
                         "val_mean": statistics_mean([fnum(r["val_accuracy"]) for r in sel]),
                         "test_mean": tm, "test_lo": tlo, "test_hi": thi,
                         "diff_vs_baseline": p["diff"] if p else float("nan"),
                         "diff_lo": p["lo"] if p else float("nan"), "diff_hi": p["hi"] if p else float("nan"),
                         "p_t": p["p_t"] if p else float("nan"), "p_sign_flip": p["p_flip"] if p else float("nan"),
                         "dead_units": dm, "dead_lo": dlo, "dead_hi": dhi,
                         "overload": om, "overload_lo": olo, "overload_hi": ohi})
    write_csv(out / "sweep.csv", sweep)
    write_csv(out / "best.csv", best)

    lines = [f"# {title}", ""]
    inv = out / "last_invocation.txt"
    if inv.is_file():
        lines += [f"Last invocation: {inv.read_text().strip()}", ""]
    lines += [f"Best-vs-best: each method at its own best learning rate on the validation split, chosen on the "
              f"selection seeds {seeds_label(select)} where they ran the setting's whole grid, else on the report "
              f"seeds {seeds_label(report_seeds)} themselves (column \"lr chosen on seeds\"); test accuracy "
              f"(%) of the report seeds {seeds_label(report_seeds)} read afterwards, mean over seeds [95% CI]; "
              "paired difference to the baseline over the same seeds [95% CI] with its two-sided paired t-test p and exact sign-flip p, both unadjusted (the "
              "verdicts, Holm over every comparison of results/README.md, come from "
              "`python -m excitation_dist.experiments.page`); dead units (of all hidden units, summed over layers) and overload (max/mean "
              "samples per unit, averaged over layers) on the validation set at the end of training.", "",
              "| setting | method | best lr | lr chosen on seeds | seeds | test acc % [95% CI] | minus baseline, pp "
              "[95% CI] | p (t) | p (sign-flip) | dead units | overload |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in best:
        p = {"n": 1 if b["strategy"] != "none" else 0, "diff": b["diff_vs_baseline"], "lo": b["diff_lo"],
             "hi": b["diff_hi"]}
        lr = f"{b['best_lr']:g}" + (" (edge)" if b["lr_at_grid_edge"] else "")
        lines.append(f"| {b['setting']} | {b['strategy']} | {lr} | {b['lr_chosen_on_seeds']} | {b['seeds']} | "
                     f"{fmt_ci(b['test_mean'], b['test_lo'], b['test_hi'], 100)} | "
                     f"{fmt_diff(p, 100) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_p(b['p_t']) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_p(b['p_sign_flip']) if b['strategy'] != 'none' else '-'} | "
                     f"{fmt_ci(b['dead_units'], b['dead_lo'], b['dead_hi'], 1, 1)} | "
                     f"{fmt_ci(b['overload'], b['overload_lo'], b['overload_hi'], 1, 2)} |")
    lines += ["", "Learning-rate sweep: validation accuracy %, mean over the seeds that choose the lr (runs that "
              "diverged count as chance-level and are marked with *).", ""]
    for s in settings:
        lrs = sorted({r["lr"] for r in sweep if r["setting"] == s})
        lines += [f"**{s}** (seeds {chosen_on[s]})", "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "| --- |" + " --- |" * len(lrs)]
        for m in methods:
            cells = []
            for lr in lrs:
                e = next((r for r in sweep if r["setting"] == s and r["strategy"] == m and r["lr"] == lr), None)
                cells.append("" if e is None else f"{100 * e['val_mean']:.1f}" + ("*" if e["diverged"] else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "tables.md").write_text("\n".join(lines) + "\n")

    on = ", ".join(f"{s}: {chosen_on[s]}" for s in settings) if len(set(chosen_on.values())) > 1 else \
        next(iter(chosen_on.values()), "")
    plots.sweep_plot(out / "lr_sweep.png", sweep, settings, methods, "validation accuracy (%)", scale=100,
                     chance=100 * chance, ylim=(0, 100),
                     title=f"{title}: learning-rate sweep, seeds {on} (mean, 95% CI)")
    plots.best_plot(out / "best_vs_best.png", best, settings, methods, "test accuracy (%)", scale=100,
                    chance=100 * chance, ylim=(0, 100), diff_label="minus baseline (pp)",
                    title=f"{title}: each method at its best validation lr (chosen on seeds {on}), test seeds "
                          f"{seeds_label(report_seeds)} (mean, 95% CI)")
    curve_rows = [{"setting": r["setting"], "strategy": r["strategy"], "seed": r["seed"], "epoch": int(c["epoch"]),
                   "diverged": int(r["diverged"]),
                   "train_loss": fnum(c["train_loss"]), "val_accuracy": fnum(c["val_accuracy"])}
                  for r, c in curves_at_best_lr(runs, curves, best, keep=lambda r: int(r["seed"]) in report_seeds)]
    plots.curves_plot(out / "training_curves.png", curve_rows, settings, methods, x_key="epoch",
                      panels=[("train_loss", "training loss (epoch mean)", 1, None, True),
                              ("val_accuracy", "validation accuracy (%)", 100, (0, 100), False)],
                      chance={"val_accuracy": 100 * chance},
                      title=f"{title}: training curves at each method's best lr (mean over the seeds that converged)")
    print((out / "tables.md").read_text())


def statistics_mean(vals: list[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["micro", "depth", "report"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--seed-list", default="", help="explicit seeds, e.g. 5,6 (overrides --seeds)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--k", type=int, default=13, help="units kept per layer (13 of 128 = ~90%% sparsity)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--strategies", default=",".join(METHODS))
    p.add_argument("--lrs", default="", help="comma-separated learning rates (default: the grid in LR_GRIDS)")
    p.add_argument("--settings", default="sgd:512,sgd:16,adam:512", help="micro: optimizer:batch,...")
    p.add_argument("--depths", default="6,8,10", help="depth: hidden layers, no residuals")
    p.add_argument("--depth-batch", type=int, default=128)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.experiment != "report":
        run_grid(args)
    title_file = args.out / "title.txt"
    title = args.title or (title_file.read_text().strip() if title_file.is_file() else "") or {  # a rerun keeps it
        "micro": "Micro-MoE on digits (4 x 128, top-13)",
        "depth": "Structural confusion (Top-13 MLP, no residuals, SGD batch 128)"}.get(args.experiment) or args.out.name
    title_file.write_text(title + "\n")
    report(args.out, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

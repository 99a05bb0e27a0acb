"""The compute issue 25 still needs, as exact commands, with a CPU-time estimate for each.

    python -m excitation_dist.experiments.plan            # print the plan (markdown)
    python -m excitation_dist.experiments.plan --shell    # only the commands, one per line, for a launcher

Estimates: seconds per run from the committed runs.csv (median of the ``seconds`` column per setting, scaled
linearly by steps), times the number of runs not yet in runs.csv; one process, one thread per run. The refined
grids (deliverable 2) are computed from the committed sweeps: wherever the best lr's mean validation metric and a
neighbour's differ by more than the seed spread (the larger SD over seeds of the two points), two log-spaced
points are added between them.

Nothing here trains; every command below reuses rows already in runs.csv (config hash), so a stopped batch can
be relaunched as is.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from excitation_dist.experiments.stats import best_lr, fnum, read_csv

ROOT = Path(__file__).resolve().parents[2]
PY = "OMP_NUM_THREADS=1 python -m excitation_dist.experiments"
SEEDS = "0,1,2,3,4"
SELECT_SEEDS = "5,6,7"  # new seeds for the choice of lr; 0-4 stay the report seeds (deliverable 3)


def _sec_per_step(results: Path) -> dict[str, float]:
    """Median seconds per optimizer step per (experiment dir, setting), from the committed runs."""
    out = {}
    spe = {"512": 3, "128": 9, "16": 72}
    for d in ("micro_moe", "micro_moe_long", "structural_confusion"):
        by: dict[str, list[float]] = {}
        for r in read_csv(results / d / "runs.csv"):
            by.setdefault(r["setting"], []).append(fnum(r["seconds"]) / (int(r["epochs"]) * spe[r["batch_size"]]))
        for s, v in by.items():
            out.setdefault(s, statistics.median(v))
    lm = [fnum(r["seconds"]) / int(r["steps"]) for r in read_csv(results / "lm_sweep" / "runs.csv")]
    out["lm"] = statistics.median(lm) if lm else 0.07
    return out


def refine(lo: float, hi: float) -> list[float]:
    """Two log-spaced points strictly between lo and hi, 2 significant digits."""
    r = hi / lo
    return [float(f"{lo * r ** (k / 3):.2g}") for k in (1, 2)]


def refined_grids(results: Path) -> list[tuple[str, str, str, list[float]]]:
    """(experiment dir, setting, method, new lrs) wherever neighbouring grid points around the optimum differ by
    more than the seed spread."""
    out = []
    for d in ("micro_moe", "micro_moe_long", "structural_confusion"):
        runs = read_csv(results / d / "runs.csv")
        for s in dict.fromkeys(r["setting"] for r in runs):
            for m in dict.fromkeys(r["strategy"] for r in runs if r["setting"] == s):
                rows = [r for r in runs if r["setting"] == s and r["strategy"] == m]
                lr, _ = best_lr(rows, "val_accuracy")
                grid = sorted({fnum(r["lr"]) for r in rows})
                vals = {g: [fnum(r["val_accuracy"]) for r in rows if fnum(r["lr"]) == g] for g in grid}
                i = grid.index(lr)
                new = []
                for j in (i - 1, i + 1):
                    if 0 <= j < len(grid):
                        gap = abs(statistics.mean(vals[lr]) - statistics.mean(vals[grid[j]]))
                        sd = max(statistics.stdev(vals[lr]) if len(vals[lr]) > 1 else 0,
                                 statistics.stdev(vals[grid[j]]) if len(vals[grid[j]]) > 1 else 0)
                        if gap > sd:
                            new += refine(min(lr, grid[j]), max(lr, grid[j]))
                new = sorted(x for x in set(new) if x not in grid)
                if new:
                    out.append((d, s, m, new))
    return out


def _setting_flag(setting: str) -> tuple[str, str]:
    """'sgd batch 512' -> ('micro', '--settings sgd:512'); 'depth 6' -> ('depth', '--depths 6')."""
    if setting.startswith("depth"):
        return "depth", f"--depths {setting.split()[1]}"
    opt, _, batch = setting.split()
    return "micro", f"--settings {opt}:{batch}"


def plan(results: Path) -> list[dict]:
    sps = _sec_per_step(results)
    items = []

    def add(group: str, why: str, cmd: str, runs: int, steps: int, setting_key: str) -> None:
        hours = runs * steps * sps.get(setting_key, sps.get("lm", 0.07)) / 3600
        items.append({"group": group, "why": why, "cmd": cmd, "runs": runs, "steps": steps, "cpu_h": hours})

    # 1. convergence: every cell still improving in its last 20% of steps, trained 5x longer (deliverable 1)
    add("1 convergence", "SGD batch 512, 150 epochs: ExpDiff and the inverted/random controls (1b has the others)",
        f"{PY}.micro_moe micro --out results/micro_moe_long --settings sgd:512 --epochs 150 --seed-list {SEEDS} "
        "--strategies expdiff --lrs 0.0032,0.0057,0.01,0.018,0.032,0.057", 30, 450, "sgd batch 512")
    add("1 convergence", "SGD batch 512, 150 epochs: inverted and random",
        f"{PY}.micro_moe micro --out results/micro_moe_long --settings sgd:512 --epochs 150 --seed-list {SEEDS} "
        "--strategies inverted,random --lrs 0.1,0.18,0.32,0.57,1,1.8,3.2", 70, 450, "sgd batch 512")
    add("1 convergence", "SGD batch 16 ExpDiff: still improving and at the top edge of its grid: 90 epochs, grid up",
        f"{PY}.micro_moe micro --out results/micro_moe_b16_long --settings sgd:16 --epochs 90 --seed-list {SEEDS} "
        "--strategies none,zerosum,positivesum,expdiff,global,inverted,random "
        "--lrs 0.0022,0.0047,0.01,0.022,0.047,0.1,0.22,0.47", 7 * 8 * 5, 6480, "sgd batch 16")
    add("1 convergence", "structural confusion depth 4 and 6, 150 epochs (1,350 steps), every method and control",
        f"{PY}.micro_moe depth --out results/structural_confusion_long --depths 4,6 --epochs 150 --seed-list {SEEDS} "
        "--strategies none,zerosum,positivesum,global,inverted,random --lrs 0.1,0.22,0.46,1.0,2.2", 2 * 6 * 5 * 5,
        1350, "depth 6")
    add("1 convergence", "structural confusion depth 4 and 6, 150 epochs: ExpDiff on its lower grid",
        f"{PY}.micro_moe depth --out results/structural_confusion_long --depths 4,6 --epochs 150 --seed-list {SEEDS} "
        "--strategies expdiff --lrs 0.00046,0.001,0.0022,0.0046,0.01,0.022", 2 * 6 * 5, 1350, "depth 6")
    add("1 convergence", "GPT-MoE, 6,000 steps (4x), 12 evaluations, every balancing setting and method at the "
        "chosen lrs and their neighbours (selection seeds 0,6,7; report seeds 1-5)",
        f"{PY}.lm_sweep --out results/lm_sweep_long --jobs 2 --steps 6000 --evals 12 "
        "--lrs 0.001,0.0022,0.0046,0.01 --strategies none,zerosum,positivesum,global --balancing aux:0.01,aux:0,bias "
        "--select-seeds 0,6,7 --report-seeds 1,2,3,4,5", 3 * 4 * (4 * 3 + 5), 6000, "lm")

    # 2. refined grids (deliverable 2), from the committed sweeps
    for d, s, m, lrs in refined_grids(results):
        exp, flag = _setting_flag(s)
        epochs = 150 if d == "micro_moe_long" else 30
        spe = {"512": 3, "16": 72}.get(s.split()[-1], 9) if exp == "micro" else 9
        add("2 refined grid", f"{d}: {s} {m}",
            f"{PY}.micro_moe {exp} --out results/{d} {flag} --epochs {epochs} --seed-list {SEEDS} --strategies {m} "
            f"--lrs {','.join(f'{x:g}' for x in lrs)}", len(lrs) * 5, epochs * spe, s)

    # 3. selection apart from the report (deliverable 3): new selection seeds on every grid; seeds 0-4 report
    add("3 selection seeds", "Micro-MoE: the whole grid on selection seeds 5,6,7 (choose on them; report seeds 0-4)",
        f"{PY}.micro_moe micro --out results/micro_moe --settings sgd:512,sgd:16,adam:512 --seed-list {SELECT_SEEDS}",
        3 * 7 * 12, 90, "adam batch 512")
    add("3 selection seeds", "structural confusion: the same, depths 4,6,8",
        f"{PY}.micro_moe depth --out results/structural_confusion --depths 4,6,8 --seed-list {SELECT_SEEDS} "
        "--strategies none,zerosum,positivesum,global --lrs 0.046,0.1,0.22,0.46,1.0,2.2", 3 * 4 * 6 * 3, 270,
        "depth 6")
    add("3 selection seeds", "GPT-MoE: selection seeds 6,7 on the 1,500-step grid (seed 0 exists)",
        f"{PY}.lm_sweep --out results/lm_sweep --jobs 2 --steps 1500 --lrs 0.001,0.0022,0.0046,0.01,0.022 "
        "--strategies none,zerosum,positivesum,global --balancing aux:0.01,aux:0,bias --select-seeds 0,6,7 "
        "--report-seeds 1,2,3,4,5", 3 * 4 * 5 * 2, 1500, "lm")

    # 6. controls where verdicts are drawn (deliverable 6)
    add("6 controls", "inverted and random at SGD batch 16 (30 epochs, the batch-16 grid)",
        f"{PY}.micro_moe micro --out results/micro_moe --settings sgd:16 --seed-list {SEEDS} "
        "--strategies inverted,random --lrs 0.0047,0.01,0.022,0.047,0.1,0.22,0.47", 2 * 7 * 5, 2160, "sgd batch 16")
    add("6 controls", "inverted and random at depth 4, 6, 8 (270 steps)",
        f"{PY}.micro_moe depth --out results/structural_confusion --depths 4,6,8 --seed-list {SEEDS} "
        "--strategies inverted,random --lrs 0.046,0.1,0.22,0.46,1.0,2.2", 3 * 2 * 6 * 5, 270, "depth 6")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--shell", action="store_true", help="only the commands")
    args = p.parse_args(argv)
    items = plan(args.results)
    if args.shell:
        for it in items:
            print(it["cmd"])
        return 0
    print("| group | what | runs | steps per run | CPU hours (est.) |\n| --- | --- | --- | --- | --- |")
    for it in items:
        print(f"| {it['group']} | {it['why']} | {it['runs']} | {it['steps']:,} | {it['cpu_h']:.1f} |")
    total = sum(it["cpu_h"] for it in items)
    print(f"\nTotal: {total:.0f} CPU hours (one thread per run; {math.ceil(total / 2)} wall hours on 2 free cores).\n")
    for it in items:
        print(f"    # {it['group']}: {it['why']}\n    {it['cmd']}\n")
    print("Still code, not compute: choosing each method's lr on the selection seeds and reporting on seeds 0-4 "
          "(micro_moe report and page.py take the choice from all seeds today); a test split for the GPT-MoE "
          "(the recipe's data module has only a validation split).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

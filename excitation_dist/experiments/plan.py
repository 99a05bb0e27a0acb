"""The compute issue 25 still needs, as exact commands, with a CPU-time estimate for each.

    python -m excitation_dist.experiments.plan            # print the plan (markdown)
    python -m excitation_dist.experiments.plan --shell    # only the commands, one per line, for a launcher

Estimates: seconds per run from the committed runs.csv (median of the ``seconds`` column per setting, scaled
linearly by steps), times the number of runs not yet in runs.csv; one process, one thread per run. A Micro-MoE
or structural-confusion item whose runs are all in its runs.csv is not listed. The refined grids (deliverable 2)
are computed from the committed sweeps: wherever the lr the page chooses (``stats.split_choice``) and a
neighbour differ, in mean validation metric over the seeds that chose it, by more than the seed spread (the
larger SD over those seeds of the two points), two log-spaced points are added between them.

Selection apart from the report (deliverable 3): the Micro-MoE experiments choose each lr on seeds 5-7 and report
seeds 0-4 wherever seeds 5-7 ran a setting's whole grid, so every new Micro-MoE cell below runs seeds 0-7, and
group 3 lists the selection-seed runs still missing from the committed grids. The GPT-MoE's held-out sweep
(``results/lm_heldout``: ``data.split=96,2,2``, lr chosen on the validation loss of seeds 0 and 6, the test loss
of seeds 1-5 reported) is listed with the runs of it not yet in its runs.csv (its report runs counted per cell,
their learning rate being chosen by the sweep first).

Nothing here trains; every command below reuses rows already in runs.csv (config hash), so a stopped batch can
be relaunched as is.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from excitation_dist.experiments import catalog
from excitation_dist.experiments.catalog import LM_HELDOUT, LM_HELDOUT_LONG, missing_runs
from excitation_dist.experiments import lm_sweep
from excitation_dist.experiments.lm_sweep import parse_balancing, run_config
from excitation_dist.experiments.stats import (REPORT_SEEDS, SELECT_SEEDS, complete_grid, fnum, of_seeds, read_csv,
                                               seeds_label, split_choice)

ROOT = Path(__file__).resolve().parents[2]
PY = "OMP_NUM_THREADS=1 python -m excitation_dist.experiments"
SEEDS = ",".join(map(str, REPORT_SEEDS))  # the report seeds
MICRO_SEEDS = ",".join(map(str, REPORT_SEEDS + SELECT_SEEDS))  # a new Micro-MoE cell: report and selection seeds
SPE = {"512": 3, "128": 9, "16": 72}  # optimizer steps per epoch on the 1,149 training digits


def _sec_per_step(results: Path) -> dict[str, float]:
    """Median seconds per optimizer step per (experiment dir, setting), from the committed runs."""
    out = {}
    for d in (e.dir for e in catalog.MICRO):
        by: dict[str, list[float]] = {}
        for r in read_csv(results / d / "runs.csv"):
            by.setdefault(r["setting"], []).append(fnum(r["seconds"]) / (int(r["epochs"]) * SPE[r["batch_size"]]))
        for s, v in by.items():
            out.setdefault(s, statistics.median(v))
    lm = [fnum(r["seconds"]) / int(r["steps"]) for r in read_csv(results / "lm_sweep" / "runs.csv")]
    out["lm"] = statistics.median(lm) if lm else 0.07
    return out


def refine(lo: float, hi: float) -> list[float]:
    """Two log-spaced points strictly between lo and hi, 2 significant digits."""
    r = hi / lo
    return [float(f"{lo * r ** (k / 3):.2g}") for k in (1, 2)]


def refinements(vals: dict[float, list[float]], lr: float) -> list[float]:
    """The points to add around the chosen ``lr`` of a grid (lr -> metric over the choosing seeds): two log-spaced
    points toward each neighbour whose mean differs from lr's by more than the larger seed SD of the two; and
    where ``lr`` is an end of the grid, one point beyond that end at the grid's last log spacing (the optimum may
    lie outside the grid)."""
    grid = sorted(vals)
    sd = {g: statistics.stdev(v) if len(v) > 1 else 0 for g, v in vals.items()}
    i, new = grid.index(lr), []
    for j in (i - 1, i + 1):
        if 0 <= j < len(grid) and abs(statistics.mean(vals[lr]) - statistics.mean(vals[grid[j]])) > max(sd[lr],
                                                                                                        sd[grid[j]]):
            new += refine(min(lr, grid[j]), max(lr, grid[j]))
    if len(grid) > 1 and i in (0, len(grid) - 1):  # an end of the grid: the optimum may lie beyond it
        new.append(float(f"{lr * lr / grid[1 if i == 0 else -2]:.2g}"))
    return sorted(x for x in set(new) if x not in grid)


def refined_grids(results: Path) -> list[tuple[str, str, str, list[float]]]:
    """(experiment dir, setting, method, new lrs) wherever neighbouring grid points around the chosen lr differ by
    more than the seed spread (over the seeds that chose it)."""
    out = []
    for d in (e.dir for e in catalog.on_page(results)):
        runs = read_csv(results / d / "runs.csv")
        for s in dict.fromkeys(r["setting"] for r in runs):
            by_method = {m: [r for r in runs if r["setting"] == s and r["strategy"] == m]
                         for m in dict.fromkeys(r["strategy"] for r in runs if r["setting"] == s)}
            split, chosen = split_choice(by_method, "val_accuracy")
            for m, (lr, _) in chosen.items():
                grid = sorted({fnum(r["lr"]) for r in of_seeds(by_method[m], REPORT_SEEDS)})
                rows = of_seeds(by_method[m], SELECT_SEEDS if split else REPORT_SEEDS)
                new = refinements({g: [fnum(r["val_accuracy"]) for r in rows if fnum(r["lr"]) == g] for g in grid}, lr)
                if new:
                    out.append((d, s, m, new))
    return out


def _setting_flag(setting: str) -> tuple[str, str]:
    """'sgd batch 512' -> ('micro', '--settings sgd:512'); 'depth 6' -> ('depth', '--depths 6')."""
    if setting.startswith("depth"):
        return "depth", f"--depths {setting.split()[1]}"
    opt, _, batch = setting.split()
    return "micro", f"--settings {opt}:{batch}"


def _flags(settings: list[str]) -> tuple[str, str]:
    """Several settings of one experiment as one command's flags."""
    exp = _setting_flag(settings[0])[0]
    vals = [_setting_flag(s)[1].split()[1] for s in settings]
    return exp, ("--depths " if exp == "depth" else "--settings ") + ",".join(vals)


def _steps(setting: str, epochs: int) -> int:
    return epochs * (9 if setting.startswith("depth") else SPE[setting.split()[-1]])


def selection_gaps(results: Path) -> list[tuple[str, str, list[str], list[float], int]]:
    """(dir, setting, methods, lrs, missing runs): the learning rates the report seeds ran at which some
    selection seed has no run yet, grouped by method sharing the same missing lrs."""
    out = []
    for d in (e.dir for e in catalog.on_page(results)):
        runs = read_csv(results / d / "runs.csv")
        for s in dict.fromkeys(r["setting"] for r in runs):
            groups: dict[tuple[float, ...], list[str]] = {}
            for m in dict.fromkeys(r["strategy"] for r in runs if r["setting"] == s):
                rows = [r for r in runs if r["setting"] == s and r["strategy"] == m]
                have = {(fnum(r["lr"]), int(r["seed"])) for r in rows}
                grid = sorted({fnum(r["lr"]) for r in of_seeds(rows, REPORT_SEEDS)})
                gap = tuple(lr for lr in grid if any((lr, k) not in have for k in SELECT_SEEDS))
                if gap:
                    groups.setdefault(gap, []).append(m)
            for lrs, ms in groups.items():
                epochs = int(next(r["epochs"] for r in runs if r["setting"] == s))
                n = missing_runs(results, d, [s], epochs, ms, list(lrs), list(SELECT_SEEDS))
                out.append((d, s, ms, list(lrs), n))
    return out


def lm_command(spec: dict) -> str:
    grid = (f"--report-at {','.join(f'{x:g}' for x in spec['report_at'])}" if spec.get("report_at") else
            f"--lrs {','.join(f'{x:g}' for x in spec['lrs'])}")
    return (f"{PY}.lm_sweep --out results/{spec['out']} --jobs 2 --steps {spec['steps']} --evals {spec['evals']} "
            f"--split {spec['split']} {grid} "
            f"--strategies {','.join(spec['strategies'])} --balancing {','.join(spec['balancing'])} "
            f"--select-seeds {','.join(map(str, spec['select']))} "
            f"--report-seeds {','.join(map(str, spec['report']))}")


def lm_missing(results: Path, spec: dict) -> int:
    """Runs of ``spec`` not yet in its runs.csv: its sweep runs by config hash (as lm_sweep computes it), and
    per (balancing, strategy) cell the report seeds without a confirm run."""
    args = lm_sweep.parser().parse_args(lm_command(spec).split()[4:])  # the command's own flags and defaults
    runs = read_csv(results / spec["out"] / "runs.csv")
    have = {r["hash"] for r in runs}
    n = 0
    for b in spec["balancing"]:
        bal = parse_balancing(b)
        for m in spec["strategies"]:
            n += sum(run_config(args, bal, m, lr, k, "sweep")["hash"] not in have
                     for lr in spec["lrs"] for k in spec["select"])
            done = {int(r["seed"]) for r in runs if r["stage"] == "confirm" and r["strategy"] == m
                    and (fnum(r["aux"]), str(r["expert_bias"]) in ("1", "True")) == bal}
            n += sum(k not in done for k in spec["report"])
    return n


def lm_followups(results: Path, spec: dict) -> list[tuple[str, str, dict, int]]:
    """Once ``spec``'s sweep is complete (``page.lm_complete``): (group, why, spec of the command, runs missing)
    for its refined grid (deliverable 2: two log-spaced points between the chosen lr and a neighbour whose mean
    validation loss over the selection seeds differs by more than their larger seed SD), its same-lr check
    (the baseline on the report seeds at each strategy's chosen lr where the baseline chose another) and
    Excitation switched on without retuning (each strategy on the report seeds at the baseline's chosen lr: the
    speed table's "at the baseline's lr" column, deliverable 5)."""
    from excitation_dist.experiments import page
    from excitation_dist.experiments.lm_sweep import setting_name

    if not (results / spec["out"] / "runs.csv").is_file():
        return []
    exp = page.load_lm(results / spec["out"], select=tuple(spec["select"]), report_seeds=tuple(spec["report"]))
    if not page.lm_complete(exp, spec["lrs"]):
        return []
    out = []
    for b in spec["balancing"]:
        s = setting_name(*parse_balancing(b))
        rows = [r for r in exp.runs if r["setting"] == s]
        for m in spec["strategies"]:
            sel = of_seeds([r for r in rows if r["strategy"] == m], spec["select"])
            vals = {lr: [fnum(r["val_loss"]) for r in sel if fnum(r["lr"]) == lr]
                    for lr in complete_grid(sel, spec["select"])}  # the points every selection seed ran
            new = refinements(vals, exp.cells[(s, m)].lr)
            if new:
                one = {**spec, "balancing": [b], "strategies": [m], "lrs": new}
                out.append(("2 refined grid", f"{spec['out']}: {s} {m}", one, lm_missing(results, one)))
        base = exp.cells[(s, "none")].lr
        for lr in sorted({exp.cells[(s, m)].lr for m in spec["strategies"]} - {base}):
            one = {**spec, "balancing": [b], "strategies": ["none"], "report_at": [lr]}
            have = {int(r["seed"]) for r in rows if r["strategy"] == "none" and fnum(r["lr"]) == lr}
            n = sum(k not in have for k in spec["report"])
            if n:
                out.append(("6 controls", f"{spec['out']}: {s}, the baseline at lr {lr:g} (a strategy's choice) on "
                            "the report seeds (same-lr check)", one, n))
        untuned = [m for m in spec["strategies"] if exp.cells[(s, m)].lr != base]
        have = {(r["strategy"], int(r["seed"])) for r in rows if fnum(r["lr"]) == base}
        n = sum((m, k) not in have for m in untuned for k in spec["report"])
        if n:
            one = {**spec, "balancing": [b], "strategies": untuned, "report_at": [base]}
            out.append(("5 speed", f"{spec['out']}: {s}, {', '.join(untuned)} at the baseline's lr {base:g} on the "
                        "report seeds (Excitation switched on without retuning)", one, n))
    return out


def plan(results: Path) -> list[dict]:
    sps = _sec_per_step(results)
    items = []
    every = list(REPORT_SEEDS + SELECT_SEEDS)

    def add(group: str, why: str, cmd: str, runs: int, steps: int, setting_key: str) -> None:
        hours = runs * steps * sps.get(setting_key, sps.get("lm", 0.07)) / 3600
        items.append({"group": group, "why": why, "cmd": cmd, "runs": runs, "steps": steps, "cpu_h": hours})

    def add_micro(group: str, why: str, d: str, settings: list[str], epochs: int, strategies: list[str],
                  lrs: list[float], seeds: list[int] = every, extra: str = "") -> None:
        """A Micro-MoE / structural-confusion grid, listed with the runs of it not yet in results/d/runs.csv."""
        n = missing_runs(results, d, settings, epochs, strategies, lrs, seeds)
        if n == 0:
            return
        exp, flag = _flags(settings)
        add(group, why, f"{PY}.micro_moe {exp} --out results/{d} {flag} --epochs {epochs} "
            f"--seed-list {','.join(map(str, seeds))} --strategies {','.join(strategies)} "
            f"--lrs {','.join(f'{x:g}' for x in lrs)}{extra}", n, _steps(settings[0], epochs), settings[0])

    controls = ["inverted", "random"]
    # 1. convergence: every cell still improving in its last 20% of steps, trained longer (deliverable 1)
    for e in catalog.MICRO:
        for g in e.grids:
            add_micro("1 convergence", g.why, e.dir, list(e.settings), e.epochs, list(g.strategies), list(g.lrs))
    n = lm_missing(results, LM_HELDOUT_LONG)
    if n:
        add("1 convergence", "GPT-MoE with the test split, 6,000 steps (4x), 12 evaluations, every balancing "
            "setting and method (selection seeds 0,6; report seeds 1-5, test loss)", lm_command(LM_HELDOUT_LONG), n,
            LM_HELDOUT_LONG["steps"], "lm")

    # 2. refined grids (deliverable 2), from the committed sweeps
    for d, s, m, lrs in refined_grids(results):
        epochs = catalog.BY_DIR[d].epochs
        add_micro("2 refined grid", f"{d}: {s} {m}", d, [s], epochs, [m], lrs)

    # 3. selection apart from the report (deliverable 3): the selection seeds on every committed grid
    for d, s, ms, lrs, n in selection_gaps(results):
        epochs = catalog.BY_DIR[d].epochs
        add_micro("3 selection seeds", f"{d}: {s}, selection seeds {seeds_label(SELECT_SEEDS)} on the grid "
                  f"seeds {seeds_label(REPORT_SEEDS)} ran ({', '.join(ms)})", d, [s], epochs, ms, lrs,
                  list(SELECT_SEEDS))
    n = lm_missing(results, LM_HELDOUT)
    if n:
        add("3 selection seeds", "GPT-MoE with a test split (data.split 96,2,2): lr chosen on the validation loss "
            "of seeds 0 and 6, the test loss of seeds 1-5 reported", lm_command(LM_HELDOUT), n,
            LM_HELDOUT["steps"], "lm")

    for group, why, one, n in lm_followups(results, LM_HELDOUT):
        if n:
            add(group, why, lm_command(one), n, one["steps"], "lm")

    # 6. controls where verdicts are drawn (deliverable 6), on the report and the selection seeds
    add_micro("6 controls", "inverted and random at SGD batch 16 (30 epochs, the batch-16 grid)", "micro_moe",
              ["sgd batch 16"], 30, controls, [0.0047, 0.01, 0.022, 0.047, 0.1, 0.22, 0.47])
    add_micro("6 controls", "inverted and random at depth 4, 6, 8 (270 steps)", "structural_confusion",
              ["depth 4", "depth 6", "depth 8"], 30, controls, [0.046, 0.1, 0.22, 0.46, 1.0, 2.2])
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

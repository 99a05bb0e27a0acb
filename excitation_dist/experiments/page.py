"""Every table of results/README.md (and the host-sync table of results/overhead/README.md), computed from the
committed raw outputs alone (runs.csv, curves.csv, the overhead benchmarks' .txt files): no training.

    python -m excitation_dist.experiments.page tables            # print every table
    python -m excitation_dist.experiments.page write             # put them into the pages, between their markers
    python -m excitation_dist.experiments.page check             # exit 1 if a page's table differs from its data
    python -m excitation_dist.experiments.page plan              # the commands still to run (see plan.py)

A table sits in a page between ``<!-- page-table: NAME -->`` and ``<!-- /page-table -->``.

Selection apart from the report (``stats.split_choice``): in the Micro-MoE and structural-confusion experiments
each method's learning rate is the one with the highest mean validation accuracy over the selection seeds 5-7,
wherever those seeds ran every learning rate the report seeds ran for every method of the setting; the test
accuracy of the report seeds 0-4 is read there. A setting without them chooses on seeds 0-4 themselves, and the
verdict tables say which seeds chose. The same-seed choice is kept as a sensitivity analysis (``table_same_seed``,
``table_loso``).

GPT-MoE: ``results/lm_heldout`` (``data.split=96,2,2``) chooses each learning rate on the validation loss of
selection seeds 0 and 6 and reports the test loss (the test split, which no choice read) of seeds 1-5; it
becomes section 3's experiment once its grid is complete (``lm_complete``: every cell's selection runs and its
report seeds), and the earlier ``results/lm_sweep`` (chosen on seed 0, validation loss reported on the tokens
that chose) becomes its sensitivity table (``table_lm_earlier``). Until then section 3 is ``lm_sweep``.

One rule for every verdict (``stats.py``): paired differences over the same seeds; two-sided paired t-test;
Holm's correction over ALL the page's comparisons (one family, listed by ``comparisons``); "better"/"worse" iff
the Holm-adjusted p < 0.05, for either sign alike; the exact sign-flip p beside it (it cannot go below 0.0625
with 5 seeds); "unconverged, no verdict" where the method's or the baseline's cell fails the convergence
criterion (``convergence``).

Convergence criterion: over the last 20% of a run's steps (validation evaluations at step >= 0.8 x the last
step), fit a least-squares line to the validation metric; its change across that window, averaged over the
cell's seeds, must be no larger in size than the seed noise of the final value (the standard deviation over
seeds of the final validation metric). A cell with a diverged seed at its chosen learning rate is "diverged"
(its curve stops) and does not count as converged.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from excitation_dist.experiments import catalog
from excitation_dist.experiments.catalog import LM_HELDOUT
from excitation_dist.experiments.stats import (ALPHA, REPORT_SEEDS, SELECT_SEEDS, choose_lr, complete_grid, fmt_ci,
                                               fmt_p, fnum, holm, mean_ci, min_sign_flip_p, of_seeds, paired_full,
                                               read_csv, rule_verdict, seeds_label, split_choice)

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["none", "zerosum", "positivesum", "expdiff", "global", "inverted", "random"]
N_TRAIN = 1149  # digits training split (micro_moe.digits)
LM_TOKENS_PER_STEP = 16 * 64  # configs/tiny_cpu.yaml: global batch 16 x seq_length 64
WINDOW = 0.2  # convergence: the last 20% of steps


# --------------------------------------------------------------------------------------------- data model
@dataclass
class Cell:
    """One (experiment, setting, method) at its chosen learning rate."""
    exp: str
    setting: str
    method: str
    lr: float
    edge: bool
    report: dict[int, float]  # seed -> reported metric (test accuracy / validation loss)
    val_final: dict[int, float]  # seed -> final validation metric
    curves: dict[int, list[tuple[int, float]]]  # seed -> [(step, validation metric)]
    total_steps: int
    higher_is_better: bool
    diverged: int = 0
    extra: dict = field(default_factory=dict)  # routing metrics: name -> list over seeds
    chosen_on: str = ""  # the seeds whose validation metric chose ``lr`` (seeds_label)


@dataclass
class Experiment:
    key: str
    title: str
    higher_is_better: bool
    settings: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell]
    runs: list[dict]
    curves: dict[str, list[tuple[int, float]]]  # run hash -> [(step, val)]
    steps_per_eval_unit: dict[str, int]  # setting -> optimizer steps per curve x unit
    lm: bool = False
    extra_metric: str = ""  # GPT-MoE: the reported metric, test_loss or val_loss
    select: tuple = SELECT_SEEDS  # seeds that choose the lr where they were run (stats.split_choice)
    report: tuple = REPORT_SEEDS  # seeds whose metric is reported
    split: dict[str, bool] = field(default_factory=dict)  # setting -> lr chosen on ``select`` (not the report seeds)
    same_cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # sensitivity: report seeds choose too

    def choice_seeds(self, setting: str) -> tuple:
        """The seeds whose validation metric chose the learning rates of ``setting``."""
        return self.select if self.split.get(setting) else self.report


def _curve_index(curves: list[dict], x_key: str, y_key: str, x_scale) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for c in curves:
        y = fnum(c.get(y_key))
        if math.isnan(y):
            continue
        out.setdefault(c["hash"], []).append((int(c[x_key]), y))
    return {h: sorted(v) for h, v in out.items()}


def load_micro(key: str, out: Path, select=SELECT_SEEDS, report=REPORT_SEEDS) -> Experiment:
    """A Micro-MoE experiment: per setting, every method's lr is chosen on the validation accuracy of the
    selection seeds where they ran over the whole setting's grid (``stats.split_choice``), else on the report
    seeds; test accuracy is read on the report seeds. ``same_cells``: the choice on the report seeds, always."""
    runs = read_csv(out / "runs.csv")
    first = {}
    for r in runs:
        first.setdefault(r["setting"], (r["optimizer"] != "sgd", -int(r["batch_size"]), int(r["depth"])))
    settings = sorted(first, key=first.get)  # the order of micro_moe.report
    methods = [m for m in METHODS if any(r["strategy"] == m for r in runs)]
    raw = _curve_index(read_csv(out / "curves.csv"), "epoch", "val_accuracy", None)
    spe = {}
    for r in runs:
        spe[r["setting"]] = math.ceil(N_TRAIN / int(r["batch_size"]))
    curves = {}
    by_hash = {r["hash"]: r for r in runs}
    for h, pts in raw.items():
        if h in by_hash:
            k = spe[by_hash[h]["setting"]]
            curves[h] = [(e * k, v) for e, v in pts]
    title = (out / "title.txt").read_text().strip() if (out / "title.txt").is_file() else key
    exp = Experiment(key, title, True, settings, methods, {}, runs, curves, spe, select=tuple(select),
                     report=tuple(report))
    for s in settings:
        by_method = {m: [r for r in runs if r["setting"] == s and r["strategy"] == m] for m in methods}
        by_method = {m: rows for m, rows in by_method.items() if rows}
        split, chosen = split_choice(by_method, "val_accuracy", exp.select, exp.report)
        exp.split[s] = split
        _, same = split_choice(by_method, "val_accuracy", exp.select, exp.report, same_seeds=True)
        for cells, choice, on in ((exp.cells, chosen, exp.choice_seeds(s)), (exp.same_cells, same, exp.report)):
            for m, (lr, edge) in choice.items():
                c = micro_cell(exp, s, m, lr, edge)
                if c is not None:
                    c.chosen_on = seeds_label(on)
                    cells[(s, m)] = c
    return exp


def micro_cell(exp: Experiment, s: str, m: str, lr: float, edge: bool = False) -> Cell | None:
    """(s, m) at ``lr`` on the report seeds."""
    at = of_seeds([r for r in exp.runs if r["setting"] == s and r["strategy"] == m and fnum(r["lr"]) == lr],
                  exp.report)
    if not at:
        return None
    total = int(at[0]["epochs"]) * exp.steps_per_eval_unit[s]
    return Cell(exp.key, s, m, lr, edge, {int(r["seed"]): fnum(r["test_accuracy"]) for r in at},
                {int(r["seed"]): fnum(r["val_accuracy"]) for r in at},
                {int(r["seed"]): exp.curves.get(r["hash"], []) for r in at}, total, True,
                sum(int(r["diverged"]) for r in at),
                {"dead units": [fnum(r["dead_units"]) for r in at], "overload": [fnum(r["overload"]) for r in at]})


def lm_setting(r: dict) -> str:
    from excitation_dist.experiments.lm_sweep import setting_name

    return setting_name(r["aux"], r.get("expert_bias", 0))


LM_HELDOUT_SELECT = tuple(LM_HELDOUT["select"])  # lm_heldout's selection seeds (report seeds 1-5, as lm_sweep's)


def load_lm(out: Path, select=(0,), report_seeds=(1, 2, 3, 4, 5)) -> Experiment:
    """A GPT-MoE sweep: each (setting, method)'s lr is the one with the lowest mean final validation loss over
    ``select``, among the lrs every selection seed ran; the report seeds' test loss is read there where every report run has one (a split with a test
    share), else their validation loss (``lm_sweep.report_metric``)."""
    from excitation_dist.experiments.lm_sweep import report_metric

    runs = read_csv(out / "runs.csv")
    for r in runs:
        r["setting"] = lm_setting(r)
    curves = _curve_index(read_csv(out / "curves.csv"), "step", "val_loss", None)
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    methods = [m for m in METHODS if any(r["strategy"] == m for r in runs)]
    exp = Experiment("lm", "GPT-MoE", False, settings, methods, {}, runs, curves, {s: 1 for s in settings}, lm=True,
                     select=tuple(select), report=tuple(report_seeds), split={s: True for s in settings})
    exp.extra_metric = report_metric(runs, report_seeds)
    for s in settings:
        for m in methods:
            rows = [r for r in runs if r["setting"] == s and r["strategy"] == m]
            got = choose_lr(rows, "val_loss", exp.select, higher_is_better=False,
                            among=complete_grid(rows, exp.select))
            if got is None:
                continue
            c = lm_cell(exp, s, m, *got)
            if c is not None:
                exp.cells[(s, m)] = c
    return exp


def lm_cell(exp: Experiment, s: str, m: str, lr: float, edge: bool = False) -> Cell | None:
    """(s, m) at ``lr`` on the report seeds."""
    at = of_seeds([r for r in exp.runs if r["setting"] == s and r["strategy"] == m and fnum(r["lr"]) == lr],
                  exp.report)
    if not at:
        return None
    loss = {int(r["seed"]): fnum(r[exp.extra_metric or "val_loss"]) for r in at}
    val = {int(r["seed"]): fnum(r["val_loss"]) for r in at}
    return Cell("lm", s, m, lr, edge, loss, val, {int(r["seed"]): exp.curves.get(r["hash"], []) for r in at},
                int(at[0]["steps"]), False, 0,
                {k: [fnum(r[k]) for r in at] for k in ("overload_last10pct", "dead_experts_last10pct",
                                                       "entropy_last10pct")}, seeds_label(exp.select))


def lm_complete(exp: Experiment, grid=None) -> bool:
    """Every (setting, method) of the sweep ran every learning rate of ``grid`` (default: every lr any method of
    the setting ran on the selection seeds) on every selection seed, and its chosen learning rate on every report
    seed. With the sweep's own grid given, points added later (refined, same-lr) leave it complete as long as
    every cell's chosen lr has its report runs."""
    if not exp.runs:
        return False
    for s in exp.settings:
        rows = [r for r in exp.runs if r["setting"] == s]
        want = {float(x) for x in grid} if grid is not None else {fnum(r["lr"]) for r in of_seeds(rows, exp.select)}
        for m in exp.methods:
            if not want <= complete_grid([r for r in rows if r["strategy"] == m], exp.select):
                return False
            c = exp.cells.get((s, m))
            if c is None or set(c.report) != set(exp.report):
                return False
    return True


def load_all(results: Path) -> dict[str, Experiment]:
    """The page's experiments; "lm" is the held-out GPT-MoE once it is complete (``lm_complete``), with the
    earlier sweep as "lm_earlier"; before that "lm" is the earlier sweep."""
    exps = {e.key: load_micro(e.key, results / e.dir) for e in catalog.on_page(results)}
    earlier = load_lm(results / "lm_sweep")
    heldout = load_lm(results / LM_HELDOUT["out"], select=LM_HELDOUT_SELECT) \
        if (results / LM_HELDOUT["out"] / "runs.csv").is_file() else None
    if heldout is not None and lm_complete(heldout, LM_HELDOUT["lrs"]):
        exps.update(lm=heldout, lm_earlier=earlier)
    else:
        exps["lm"] = earlier
    return exps


# ------------------------------------------------------------------------------------------- convergence
def ols_slope(pts: list[tuple[float, float]]) -> float:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def convergence(cell: Cell) -> dict:
    """The criterion in the module docstring. change: mean over seeds of the fitted change of the validation
    metric across the last 20% of steps, signed so that positive = still improving; noise: SD over seeds of
    the final validation metric."""
    if cell.diverged:
        return {"status": "diverged", "change": float("nan"), "noise": float("nan"), "converged": False}
    changes, finals = [], []
    for seed, pts in sorted(cell.curves.items()):
        win = [p for p in pts if p[0] >= (1 - WINDOW) * cell.total_steps]
        if len(win) < 2 or pts[-1][0] < cell.total_steps:
            return {"status": "no curve", "change": float("nan"), "noise": float("nan"), "converged": False}
        ch = ols_slope(win) * (win[-1][0] - win[0][0])
        changes.append(ch if cell.higher_is_better else -ch)
        finals.append(pts[-1][1])
    change = statistics.mean(changes)
    noise = statistics.stdev(finals) if len(finals) > 1 else float("nan")
    ok = abs(change) <= noise
    return {"status": "converged" if ok else ("still improving" if change > 0 else "still getting worse"),
            "change": change, "noise": noise, "converged": ok}


# ------------------------------------------------------------------------------------------- comparisons
SECTION = {**{e.key: e.section for e in catalog.MICRO}, "lm": "3"}


def family(exps: dict[str, Experiment]) -> list[str]:
    """The page's experiments in page order (sections 1, 1b, 1c, 2, 2b, 3): those loaded."""
    return sorted((k for k in exps if k in SECTION), key=lambda k: SECTION[k])


def comparisons(exps: dict[str, Experiment], same_seeds: bool = False) -> list[dict]:
    """Every method-vs-baseline comparison on the page, in page order, with the page-wide Holm correction
    and the verdict of the one rule. ``same_seeds``: the sensitivity analysis, the whole page again with the
    Micro-MoE learning rates chosen on the report seeds themselves (the GPT-MoE as on the page)."""
    out = []
    for key in family(exps):
        e = exps[key]
        cells = e.same_cells if same_seeds and not e.lm else e.cells
        for s in e.settings:
            base = cells.get((s, "none"))
            if base is None:
                continue
            for m in e.methods:
                c = cells.get((s, m))
                if m == "none" or c is None:
                    continue
                out.append(_comparison(key, "best-vs-best", s, c, base))
    out += same_lr_comparisons(exps["lm"])
    adj = holm([c["p_t"] for c in out])
    for c, p in zip(out, adj):
        c["p_holm"] = p
        c["verdict"] = rule_verdict(c["diff"], p, c["higher_is_better"], c["converged"])
        c["verdict_if_converged"] = rule_verdict(c["diff"], p, c["higher_is_better"], True)
    return out


def same_lr_comparisons(e: Experiment) -> list[dict]:
    """The GPT-MoE's same-lr check: where a method's chosen lr differs from the baseline's and the baseline ran
    the method's lr on the same report seeds, the method against the baseline at that lr (the earlier sweep ran
    the baseline at the strategies' 0.0022 with aux-free bias)."""
    out = []
    for s in e.settings:
        chosen = e.cells.get((s, "none"))
        for m in e.methods:
            c = e.cells.get((s, m))
            if m == "none" or c is None or chosen is None or c.lr == chosen.lr:
                continue
            base = lm_cell(e, s, "none", c.lr)
            if base is not None and set(base.report) == set(c.report):
                out.append(_comparison(e.key, f"same lr {c.lr:g}", s, c, base))
    return out


def _conv_word(cm: dict, cb: dict) -> str:
    if cm["converged"] and cb["converged"]:
        return "yes"
    bad = [w for w, c in (("method", cm), ("baseline", cb)) if not c["converged"]]
    return "no: " + " and ".join(bad)


def _comparison(key: str, kind: str, setting: str, c: Cell, base: Cell) -> dict:
    p = paired_full(c.report, base.report)
    cm, cb = convergence(c), convergence(base)
    return {"exp": key, "kind": kind, "setting": setting, "method": c.method, "lr": c.lr, "edge": c.edge,
            "base_lr": base.lr, "cell": c, "base": base, "higher_is_better": c.higher_is_better, **p,
            "converged": cm["converged"] and cb["converged"], "conv": _conv_word(cm, cb)}


# ------------------------------------------------------------------------------------------------ tables
def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _lr(c: Cell) -> str:
    return f"{c.lr:g}" + (" (edge)" if c.edge else "")


def _scale(key: str) -> tuple[float, int]:
    return (1.0, 3) if key == "lm" else (100.0, 1)


def table_verdicts(exps, comps, key: str) -> str:
    e = exps[key]
    scale, dg = _scale(key)
    value = f"{_lm_quoted(e)} loss, nats/byte [95% CI]" if key == "lm" else "test acc % [95% CI]"
    diff = "minus baseline, nats/byte [95% CI]" if key == "lm" else "minus baseline, pp [95% CI]"
    rows = []
    for s in e.settings:
        base = e.cells.get((s, "none"))
        if base is None:
            continue
        cb = convergence(base)
        rows.append([s, "none", _lr(base), _on(base), str(len(base.report)),
                     fmt_ci(*mean_ci(list(base.report.values())), scale, dg),
                     "-", "-", "-", "-", "yes" if cb["converged"] else "no", "-"])
        for c in comps:
            if c["exp"] == key and c["kind"] == "best-vs-best" and c["setting"] == s:
                cell = c["cell"]
                rows.append([s, c["method"], _lr(cell), _on(cell), str(c["n"]),
                             fmt_ci(*mean_ci(list(cell.report.values())), scale, dg), _fmt_d(c, scale, dg),
                             fmt_p(c["p_t"]), fmt_p(c["p_holm"]), fmt_p(c["p_flip"]), c["conv"], c["verdict"]])
    return _md(["setting", "method", "best lr", "lr chosen on seeds", "seeds reported", value, diff, "p (t)",
                "p (Holm, page)", "p (sign-flip, exact)", "converged", "verdict"], rows)


def _lm_quoted(e: Experiment) -> str:
    return "test" if e.extra_metric == "test_loss" else "val"


def _on(c: Cell) -> str:
    """The seeds that chose the cell's lr; "(as reported)" where they are the reported seeds themselves."""
    same = c.chosen_on == seeds_label(c.report)
    return c.chosen_on + (" (as reported)" if same else "")


def _fmt_d(c: dict, scale: float, dg: int) -> str:
    return f"{c['diff'] * scale:+.{dg}f} [{c['lo'] * scale:+.{dg}f}, {c['hi'] * scale:+.{dg}f}]"


def table_same_lr(exps, comps) -> str:
    rows = []
    for c in comps:
        if not c["kind"].startswith("same lr"):
            continue
        rows.append([c["setting"], c["method"], f"{c['lr']:g}", str(c["n"]),
                     fmt_ci(*mean_ci(list(c["cell"].report.values())), 1, 3),
                     fmt_ci(*mean_ci(list(c["base"].report.values())), 1, 3), _fmt_d(c, 1, 3), fmt_p(c["p_t"]),
                     fmt_p(c["p_holm"]), fmt_p(c["p_flip"]), c["conv"], c["verdict"]])
    return _md(["balancing", "method", "lr (both)", "seeds", f"{_lm_quoted(exps['lm'])} loss [95% CI]",
                "baseline at that lr",
                "minus baseline [95% CI]", "p (t)", "p (Holm, page)", "p (sign-flip, exact)", "converged",
                "verdict"], rows)


def table_routing(exps, key: str) -> str:
    e = exps[key]
    rows = []
    if key == "lm":
        for s in e.settings:
            for m in e.methods:
                c = e.cells.get((s, m))
                if c is None:
                    continue
                o, d, h = (c.extra[k] for k in ("overload_last10pct", "dead_experts_last10pct", "entropy_last10pct"))
                rows.append([s, m, fmt_ci(*mean_ci(o), 1, 2), fmt_ci(*mean_ci(d), 1, 2), f"{statistics.mean(h):.3f}"])
        return _md(["balancing", "method", "overload", "dead experts / step", "entropy"], rows)
    for s in e.settings:
        for m in e.methods:
            c = e.cells.get((s, m))
            if c is None:
                continue
            rows.append([s, m, _lr(c), fmt_ci(*mean_ci(c.extra["dead units"]), 1, 1),
                         fmt_ci(*mean_ci(c.extra["overload"]), 1, 2)])
    return _md(["setting", "method", "best lr", "dead units [95% CI]", "overload [95% CI]"], rows)


def table_routing_same_lr(exps, setting="adam batch 512", lr=0.0022) -> str:
    e = exps["micro"]
    rows = []
    for m in e.methods:
        c = micro_cell(e, setting, m, lr)
        if c is not None:
            rows.append([setting, m, f"{lr:g}", fmt_ci(*mean_ci(c.extra["dead units"]), 1, 1),
                         fmt_ci(*mean_ci(c.extra["overload"]), 1, 2),
                         fmt_ci(*mean_ci(list(c.val_final.values())), 100, 1)])
    return _md(["setting", "method", "lr (all)", "dead units [95% CI]", "overload [95% CI]",
                "val acc % [95% CI]"], rows)


def table_sweep(exps, key: str, settings: list[str] | None = None) -> str:
    """Validation metric over the grid (mean over the seeds that chose the lr; * = some runs diverged)."""
    e = exps[key]
    blocks = []
    for s in settings or e.settings:
        sel = of_seeds([r for r in e.runs if r["setting"] == s], e.choice_seeds(s))
        lrs = sorted({fnum(r["lr"]) for r in sel})
        rows = []
        for m in e.methods:
            cells = []
            for lr in lrs:
                at = [r for r in sel if r["strategy"] == m and fnum(r["lr"]) == lr]
                if not at:
                    cells.append("")
                elif key == "lm":
                    cells.append(f"{statistics.mean(fnum(r['val_loss']) for r in at):.3f}")
                else:
                    v = statistics.mean(fnum(r["val_accuracy"]) for r in at)
                    cells.append(f"{100 * v:.1f}" + ("*" if any(int(r["diverged"]) for r in at) else ""))
            if any(cells):
                rows.append([m] + cells)
        blocks.append((f"**{s}**\n\n" if len(settings or e.settings) > 1 else "") +
                      _md(["method"] + [f"{lr:g}" for lr in lrs], rows))
    return "\n\n".join(blocks)


def table_convergence(exps) -> str:
    rows = []
    for key in family(exps):
        e = exps[key]
        scale, dg = _scale(key)
        unit = "nats/byte" if key == "lm" else "pp"
        for s in e.settings:
            for m in e.methods:
                c = e.cells.get((s, m))
                if c is None:
                    continue
                cv = convergence(c)
                fin = fmt_ci(*mean_ci(list(c.val_final.values())), scale, dg)
                ch = "-" if math.isnan(cv["change"]) else f"{cv['change'] * scale:+.{dg + 1}f}"
                nz = "-" if math.isnan(cv["noise"]) else f"{cv['noise'] * scale:.{dg + 1}f}"
                rows.append([SECTION[key], s, m, _lr(c), str(c.total_steps), fin, f"{ch} {unit}" if ch != "-" else ch,
                             f"{nz} {unit}" if nz != "-" else nz, cv["status"]])
    return _md(["section", "setting", "method", "lr", "steps", "final val metric [95% CI]",
                "change over last 20% (+ = improving)", "seed SD of final", "status"], rows)


def _first_reach(pts, target, higher) -> int | None:
    for step, v in pts:
        if (v >= target) if higher else (v <= target):
            return step
    return None


def speed_of(c: Cell, target: float) -> tuple[list[int], int]:
    got = [_first_reach(pts, target, c.higher_is_better) for _, pts in sorted(c.curves.items())]
    return [g for g in got if g is not None], len(got)


def _fmt_speed(steps: list[int], n: int, per_step: int = 1) -> str:
    if not steps:
        return f"0/{n} reach"
    if len(steps) < n:
        return f"{len(steps)}/{n} reach (their mean {statistics.mean(steps) * per_step:,.0f})"
    m, lo, hi = mean_ci([s * per_step for s in steps])
    if math.isnan(lo):
        return f"{m:,.0f}"
    return f"{m:,.0f} [{lo:,.0f}, {hi:,.0f}]"


def table_speed(exps) -> str:
    """Steps (tokens for the LM) to reach the tuned baseline's final validation value (mean over its seeds),
    at each method's own tuned lr and at the baseline's tuned lr (Excitation switched on without retuning)."""
    rows = []
    for key in family(exps):
        e = exps[key]
        scale, dg = _scale(key)
        for s in e.settings:
            base = e.cells.get((s, "none"))
            if base is None:
                continue
            target = statistics.mean(base.val_final.values())
            for m in e.methods:
                c = e.cells.get((s, m))
                if c is None:
                    continue
                own = _fmt_speed(*speed_of(c, target))
                at_base = (micro_cell(e, s, m, base.lr) if key != "lm" else lm_cell(e, s, m, base.lr))
                ab = _fmt_speed(*speed_of(at_base, target)) if at_base is not None else "not run"
                tok = _fmt_speed(*speed_of(c, target), per_step=LM_TOKENS_PER_STEP) if key == "lm" else "-"
                rows.append([SECTION[key], s, f"{target * scale:.{dg}f}", m, _lr(c), str(c.total_steps), own, tok,
                             f"{base.lr:g}", ab])
    return _md(["section", "setting", "target (baseline's final val)", "method", "own lr", "steps run",
                "steps to target, own lr [95% CI]", "tokens to target, own lr", "baseline's lr",
                "steps to target at baseline's lr"], rows)


def loso(e: Experiment, s: str, m: str) -> dict | None:
    """Leave-one-seed-out selection: for each seed, choose the lr on the other seeds' validation accuracy and
    read that seed's test accuracy there (method and baseline alike); paired over seeds."""
    def held_out(method: str) -> tuple[dict[int, float], list[float]]:
        rows = of_seeds([r for r in e.runs if r["setting"] == s and r["strategy"] == method], e.report)
        seeds = sorted({int(r["seed"]) for r in rows})
        acc, lrs = {}, []
        for k in seeds:
            lr, _ = choose_lr(rows, "val_accuracy", [j for j in seeds if j != k])
            lrs.append(lr)
            hit = [r for r in rows if int(r["seed"]) == k and fnum(r["lr"]) == lr]
            if hit:
                acc[k] = fnum(hit[0]["test_accuracy"])
        return acc, lrs
    mm, mlrs = held_out(m)
    bb, blrs = held_out("none")
    p = paired_full(mm, bb)
    return {**p, "lrs": mlrs, "base_lrs": blrs}


def table_loso(exps, same) -> str:
    """Leave-one-seed-out on the report seeds, beside the same-seed choice it perturbs (``same``: the
    comparisons of ``comparisons(exps, same_seeds=True)``)."""
    rows = []
    for c in same:
        if c["kind"] != "best-vs-best" or c["exp"] == "lm":
            continue
        e = exps[c["exp"]]
        lo = loso(e, c["setting"], c["method"])
        rows.append([SECTION[c["exp"]], c["setting"], c["method"], _fmt_d(c, 100, 1),
                     ",".join(f"{x:g}" for x in sorted(set(lo["lrs"]))),
                     ",".join(f"{x:g}" for x in sorted(set(lo["base_lrs"]))), _fmt_d(lo, 100, 1), fmt_p(lo["p_t"]),
                     c["verdict_if_converged"]])
    return _md(["section", "setting", "method", f"seeds {seeds_label(REPORT_SEEDS)} choose and report, pp [95% CI]",
                "lrs chosen, leave-one-out (method)", "(baseline)", "leave-one-seed-out, pp [95% CI]",
                "p (t, unadjusted)", "same-seed verdict if converged"], rows)


def table_same_seed(exps, comps, same) -> str:
    """The sensitivity analysis beside the page: each Micro-MoE comparison whose lrs the page chose on the
    selection seeds, again with the lrs chosen on the report seeds themselves (validation split for the choice,
    test split for the report, the same seeds); its Holm correction and verdicts are those of the whole page
    recomputed that way (``comparisons(exps, same_seeds=True)``)."""
    alt = {(c["exp"], c["kind"], c["setting"], c["method"]): c for c in same}
    rows = []
    for c in comps:
        if c["kind"] != "best-vs-best" or c["exp"] == "lm" or not exps[c["exp"]].split.get(c["setting"]):
            continue
        a = alt[(c["exp"], c["kind"], c["setting"], c["method"])]
        rows.append([SECTION[c["exp"]], c["setting"], c["method"], f"{c['lr']:g} / {c['base_lr']:g}",
                     _fmt_d(c, 100, 1), c["verdict"], f"{a['lr']:g} / {a['base_lr']:g}", _fmt_d(a, 100, 1),
                     fmt_p(a["p_t"]), fmt_p(a["p_holm"]), a["conv"], a["verdict"]])
    sel, rep = seeds_label(SELECT_SEEDS), seeds_label(REPORT_SEEDS)
    return _md(["section", "setting", "method", f"page: lr (method / baseline), chosen on seeds {sel}",
                "page: minus baseline, pp [95% CI]", "page verdict",
                f"same seeds: lr (method / baseline), chosen on seeds {rep}", "same seeds: minus baseline, pp [95% CI]",
                "p (t)", "p (Holm, same-seed page)", "converged", "same-seed verdict"], rows)


def table_lm_earlier(exps, comps) -> str:
    """The held-out GPT-MoE's comparisons beside the earlier sweep's (lr chosen on seed 0; validation loss
    reported on the tokens that chose; not in the page's Holm family)."""
    earlier = exps["lm_earlier"]
    rows = []
    for c in comps:
        if c["exp"] != "lm" or c["kind"] != "best-vs-best":
            continue
        ce, be = earlier.cells.get((c["setting"], c["method"])), earlier.cells.get((c["setting"], "none"))
        if ce is None or be is None:
            continue
        a = _comparison("lm", "earlier", c["setting"], ce, be)
        rows.append([c["setting"], c["method"], f"{c['lr']:g} / {c['base_lr']:g}", _fmt_d(c, 1, 3), c["verdict"],
                     f"{a['lr']:g} / {a['base_lr']:g}", _fmt_d(a, 1, 3), fmt_p(a["p_t"]), a["conv"]])
    sel = seeds_label(exps["lm"].select)
    return _md(["balancing", "method", f"held out: lr (method / baseline), chosen on seeds {sel}",
                "held out: test loss minus baseline, nats/byte [95% CI]", "page verdict",
                f"earlier: lr, chosen on seed(s) {seeds_label(earlier.select)}",
                "earlier: val loss minus baseline, nats/byte [95% CI]", "p (t, unadjusted)", "converged"], rows)


def table_rule_summary(comps) -> str:
    n = len(comps)
    apart = sum(c["cell"].chosen_on != seeds_label(c["cell"].report) and c["base"].chosen_on != seeds_label(
        c["base"].report) for c in comps)
    ns = sorted({c["n"] for c in comps})
    counts: dict[str, int] = {}
    for c in comps:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    flips = min(c["p_flip"] for c in comps)
    rows = [["comparisons on this page (the Holm family)", str(n)],
            ["of them with every lr chosen on seeds not reported", str(apart)],
            ["seeds per comparison", ", ".join(map(str, ns))],
            ["smallest possible exact sign-flip p at that n", ", ".join(f"{min_sign_flip_p(k):.4f}" for k in ns)],
            ["smallest sign-flip p observed", f"{flips:.4f}"],
            ["comparisons the exact test alone could call (p < 0.05)", str(sum(c["p_flip"] < ALPHA for c in comps))],
            ["unadjusted paired-t p < 0.05", str(sum(c["p_t"] < ALPHA for c in comps))],
            ["Holm-adjusted p < 0.05", str(sum(c["p_holm"] < ALPHA for c in comps))]]
    rows += [[f"verdict: {k}", str(v)] for k, v in sorted(counts.items())]
    return _md(["", "count"], rows)


# ------------------------------------------------------------------------------------- overhead host syncs
_ROW = re.compile(r"^(small|medium|large)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                  r"\s+(\d+)\s+(\d+)\s+(\d+)\s")


def parse_overhead(path: Path) -> list[dict]:
    """The all-variants table of an overhead benchmark's raw output: one row per (size, variant), with the
    "+sync" column (max over ranks) and the rank-0 breakdown printed under it ("added host syncs: {...}")."""
    rows, last_was_row = [], False
    for line in path.read_text().splitlines():
        mt = _ROW.match(line)
        if mt:
            rows.append({"size": mt[1], "variant": mt[2], "min": mt[5], "median": mt[6], "max": mt[7],
                         "coll": mt[9], "cnt": mt[10], "syncs": int(mt[11]), "rank0": 0, "ops": {}})
            last_was_row = True
            continue
        if "added host syncs:" in line and last_was_row:
            import ast

            ops = ast.literal_eval(line.split("added host syncs:", 1)[1].strip())
            rows[-1]["ops"] = ops
            rows[-1]["rank0"] = sum(ops.values())
        last_was_row = False
    return rows


def table_overhead_syncs(results: Path) -> str:
    rows = []
    for backend, fname in (("plain PyTorch", "core_overhead.txt"), ("DeepSpeed", "deepspeed_overhead.txt"),
                           ("Megatron", "megatron_overhead.txt")):
        for r in parse_overhead(results / "overhead" / fname):
            ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items()) or "-"
            rows.append([backend, r["size"], r["variant"], r["min"], r["median"], r["max"], r["coll"], r["cnt"],
                         str(r["syncs"]), str(r["rank0"]), ops])
    return _md(["backend", "size", "variant", "rounds min", "median", "max", "+coll", "count all-reduces",
                "+syncs (max over ranks)", "+syncs (rank 0)", "rank 0's added ops"], rows)


# ------------------------------------------------------------------------------------------- the pages
def all_tables(results: Path) -> dict[str, tuple[Path, str]]:
    """name -> (page it belongs on, markdown)."""
    exps = load_all(results)
    comps = comparisons(exps)
    same = comparisons(exps, same_seeds=True)
    page, over = results / "README.md", results / "overhead" / "README.md"
    return {
        "rule-summary": (page, table_rule_summary(comps)),
        "micro-verdicts": (page, table_verdicts(exps, comps, "micro")),
        "micro-routing": (page, table_routing(exps, "micro")),
        "micro-routing-same-lr": (page, table_routing_same_lr(exps)),
        **{f"{k.replace('_', '-')}-{kind}": (page, fn(k)) for k in family(exps) if catalog.BY_KEY.get(k)
           and catalog.BY_KEY[k].grids for kind, fn in (("verdicts", lambda k: table_verdicts(exps, comps, k)),
                                                       ("sweep", lambda k: table_sweep(exps, k)))},
        **({"depth-long-routing": (page, table_routing(exps, "depth_long"))} if "depth_long" in exps else {}),
        "depth-verdicts": (page, table_verdicts(exps, comps, "depth")),
        "depth-routing": (page, table_routing(exps, "depth")),
        "lm-verdicts": (page, table_verdicts(exps, comps, "lm")),
        **({"lm-same-lr": (page, table_same_lr(exps, comps))}
           if any(c["kind"].startswith("same lr") for c in comps) else {}),
        "lm-routing": (page, table_routing(exps, "lm")),
        "lm-sweep": (page, table_sweep(exps, "lm")),
        "convergence": (page, table_convergence(exps)),
        "speed": (page, table_speed(exps)),
        "same-seed": (page, table_same_seed(exps, comps, same)),
        "loso": (page, table_loso(exps, same)),
        "overhead-syncs": (over, table_overhead_syncs(results)),
        **({"lm-earlier": (page, table_lm_earlier(exps, comps))} if "lm_earlier" in exps else {}),
    }


_BLOCK = re.compile(r"(<!-- page-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /page-table -->)", re.S)


def page_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def write_pages(tables: dict[str, tuple[Path, str]]) -> list[str]:
    missing = []
    for path in {p for p, _ in tables.values()}:
        text = path.read_text()
        names = page_blocks(text)
        for name, (p, body) in tables.items():
            if p == path and name not in names:
                missing.append(f"{path}: {name}")
        text = _BLOCK.sub(lambda m: m[1] + (tables[m["name"]][1] if m["name"] in tables else m["body"]) + m[4], text)
        path.write_text(text)
    return missing


def check_pages(tables: dict[str, tuple[Path, str]]) -> list[str]:
    bad = []
    for name, (path, body) in tables.items():
        got = page_blocks(path.read_text()).get(name)
        if got is None:
            bad.append(f"{path}: table {name} missing")
        elif got != body:
            bad.append(f"{path}: table {name} differs from its data")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["tables", "write", "check", "plan"])
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    if args.command == "plan":
        from excitation_dist.experiments import plan

        return plan.main([])
    tables = all_tables(args.results)
    if args.command == "tables":
        for name, (path, body) in tables.items():
            print(f"<!-- page-table: {name} -->  ({path.relative_to(args.results.parent)})\n{body}\n")
        return 0
    if args.command == "write":
        missing = write_pages(tables)
        for m in missing:
            print(f"no marker for {m}", file=sys.stderr)
        return 1 if missing else 0
    bad = check_pages(tables)
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

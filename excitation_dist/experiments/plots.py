"""Plots shared by the experiments: one y-range per panel group, chance lines,
legends outside the data, learning-rate sweeps and training curves."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

COLORS = {"none": "black", "zerosum": "tab:blue", "positivesum": "tab:orange", "expdiff": "tab:green",
          "global": "tab:red", "inverted": "tab:purple", "random": "tab:brown"}
LABELS = {"none": "baseline"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(m: str) -> str:
    return LABELS.get(m, m)


def _style(m: str) -> dict:
    if m == "none":
        return {"color": "black", "lw": 2.2, "zorder": 5}
    controls = {"global", "inverted", "random"}
    return {"color": COLORS.get(m, None), "lw": 1.4, "ls": "--" if m in controls else "-"}


def _finish(fig, axes, title: str, path: Path, handles_from=None) -> None:
    ax = handles_from if handles_from is not None else axes[0]
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.suptitle(title, fontsize=11)
    fig.legend(list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def sweep_plot(path: Path, sweep: list[dict], settings: list[str], methods: list[str], ylabel: str, *,
               scale: float = 1.0, chance: float | None = None, ylim=None, title: str = "", logy: bool = False,
               key: str = "val") -> None:
    """One panel per setting: metric (mean and 95% CI band) against learning rate, one line per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings) + 0.5, 3.6), squeeze=False,
                             sharey=True)
    axes = axes[0]
    for ax, s in zip(axes, settings):
        for m in methods:
            pts = sorted((r for r in sweep if r["setting"] == s and r["strategy"] == m), key=lambda r: r["lr"])
            if not pts:
                continue
            xs = [r["lr"] for r in pts]
            ys = [scale * r[f"{key}_mean"] for r in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=_label(m), **_style(m))
            bad = [(x, y) for x, y, r in zip(xs, ys, pts) if int(r.get("diverged", 0) or 0) > 0]
            if bad:  # some seeds diverged there (counted at chance in the mean)
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=40, color="red", zorder=6,
                           label="some seeds diverged")
            lo = [scale * r[f"{key}_lo"] for r in pts]
            hi = [scale * r[f"{key}_hi"] for r in pts]
            if not any(math.isnan(v) for v in lo + hi):
                ax.fill_between(xs, lo, hi, color=_style(m)["color"], alpha=0.12, lw=0)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1.2, label="chance")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    _finish(fig, axes, title, path)


def best_plot(path: Path, best: list[dict], settings: list[str], methods: list[str], ylabel: str, *,
              scale: float = 1.0, chance: float | None = None, ylim=None, diff_label: str = "minus baseline",
              title: str = "", value: str = "test") -> None:
    """Top row: each method at its best lr (mean, 95% CI), one shared y-range. Bottom row: paired difference
    to the baseline (mean, 95% CI), zero line, each panel with its own y-range."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(settings), figsize=(3.6 * len(settings) + 0.5, 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for j in range(1, len(settings)):  # the top row shares one y-range; the minus-baseline row is per panel,
        axes[0][j].sharey(axes[0][0])  # so that each panel's intervals are visible
    for j, s in enumerate(settings):
        top, bot = axes[0][j], axes[1][j]
        for i, m in enumerate(methods):
            b = next((r for r in best if r["setting"] == s and r["strategy"] == m), None)
            if b is None:
                continue
            c = _style(m)["color"]
            mean, lo, hi = (scale * b[f"{value}_mean"], scale * b[f"{value}_lo"], scale * b[f"{value}_hi"])
            err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
            top.errorbar([i], [mean], yerr=err, fmt="o", color=c, capsize=4, label=_label(m))
            if m != "none" and not math.isnan(b["diff_vs_baseline"]):
                d, dlo, dhi = (scale * b["diff_vs_baseline"], scale * b["diff_lo"], scale * b["diff_hi"])
                derr = None if math.isnan(dlo) else [[d - dlo], [dhi - d]]
                bot.errorbar([i], [d], yerr=derr, fmt="o", color=c, capsize=4)
        if chance is not None:
            top.axhline(chance, color="grey", ls=":", lw=1.2, label="chance")
        bot.axhline(0, color="black", lw=0.8)
        if ylim is not None:
            top.set_ylim(*ylim)
        top.set_title(s, fontsize=10)
        lr_of = {r["strategy"]: r.get("best_lr") for r in best if r["setting"] == s}
        ticks = [_label(m) + (f"\nlr {lr_of[m]:g}" if isinstance(lr_of.get(m), float) else "") for m in methods]
        for ax in (top, bot):
            ax.set_xticks(range(len(methods)), ticks, rotation=60, ha="right", fontsize=8)
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.grid(axis="y", alpha=0.3)
        top.tick_params(labelbottom=False)
    axes[0][0].set_ylabel(ylabel)
    axes[1][0].set_ylabel(diff_label)
    _finish(fig, axes[0], title, path)


def curves_plot(path: Path, rows: list[dict], settings: list[str], methods: list[str], *, x_key: str,
                panels: list[tuple], chance: dict | None = None, title: str = "", xlabel: str | None = None,
                own_y: tuple = ()) -> None:
    """Rows of panels (one per metric), one column per setting, one line per
    method (mean over seeds). panels: (key, ylabel, scale, ylim, logy). Rows whose key is in ``own_y``
    (e.g. "minus baseline" rows) get a y-range per panel; the others one per row.

    Rows of a diverged run (``diverged`` true; ``seed`` names the run) stay out of the mean, whose
    scale one exploding loss would set: the line is the mean over the seeds that converged, an
    ``x`` on it marks the last point of each diverged seed, and the setting's top panel says how many diverged."""
    plt = _plt()
    fig, axes = plt.subplots(len(panels), len(settings), figsize=(3.6 * len(settings) + 0.5, 3.1 * len(panels)),
                             squeeze=False, sharex="col")
    for i, panel in enumerate(panels):
        if panel[0] not in own_y:
            for j in range(1, len(settings)):
                axes[i][j].sharey(axes[i][0])
    for j, s in enumerate(settings):
        for i, (key, ylabel, scale, ylim, logy) in enumerate(panels):
            ax = axes[i][j]
            notes = []
            for m in methods:
                pts: dict[float, list[float]] = {}
                gone: dict = {}  # diverged seed -> its last x
                seeds = set()
                for r in rows:
                    if r["setting"] != s or r["strategy"] != m:
                        continue
                    seeds.add(r.get("seed"))
                    if r.get("diverged"):
                        gone[r.get("seed")] = max(gone.get(r.get("seed"), r[x_key]), r[x_key])
                    elif not math.isnan(r[key]):
                        pts.setdefault(r[x_key], []).append(r[key])
                if gone:
                    notes.append(f"{_label(m)}: {len(gone)} of {len(seeds)} seeds diverged")
                if not pts:
                    continue
                xs = sorted(pts)
                ys = [scale * statistics.mean(pts[x]) for x in xs]
                line, = ax.plot(xs, ys, label=_label(m), **_style(m))
                marks = [(x, ys[xs.index(x)]) for x in gone.values() if x in pts]
                if marks:
                    ax.plot(*zip(*marks), ls="none", marker="x", ms=7, mew=1.6, color=line.get_color())
            if notes and i == 0:  # said once per setting, in its top panel
                ax.text(0.02, 0.02, "\n".join(notes) + " (left out of the mean)", transform=ax.transAxes,
                        fontsize=6.5, va="bottom", ha="left", color="0.25")
            if chance and key in chance:
                ax.axhline(chance[key], color="grey", ls=":", lw=1.2, label="chance")
            if logy:
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                lo, hi = ax.get_ylim()
                if hi / lo < 10:  # less than a decade: label the minor ticks too
                    ax.yaxis.set_minor_formatter(plain)
                    ax.tick_params(axis="y", which="minor", labelsize=7)
            if ylim is not None:
                ax.set_ylim(*ylim)
            if i == 0:
                ax.set_title(s, fontsize=10)
            if j == 0 or key in own_y:
                ax.set_ylabel(ylabel)
            if i == len(panels) - 1:
                ax.set_xlabel(xlabel or x_key)
            ax.grid(alpha=0.3)
    handles_ax = next((axes[len(panels) - 1][j] for j in range(len(settings))
                       if axes[len(panels) - 1][j].get_legend_handles_labels()[0]), axes[0][0])
    _finish(fig, axes[0], title, path, handles_from=handles_ax)

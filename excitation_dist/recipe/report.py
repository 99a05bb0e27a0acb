"""``excitation-dist report``: PNG plots from runs' metrics.jsonl.

- ``loss.png``: training (and validation) loss of every run, side by side;
- ``utilization.png``: per-layer heatmaps of expert load / ideal load over steps,
  one column per run, and ``utilization_<run>.png`` per run: all on one colour
  scale, so that equal colours mean equal load in every picture;
- ``multipliers.png``: the range (min..max) and mean of the multipliers over steps.

Runs are labelled by what they are (strategy and gamma, from ``run.json``),
with the directory name added only where two runs would read alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from excitation_dist.recipe.metrics_log import read_metrics, read_run_info


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short distinct names: the directory name, with as many parent directories
    as it takes to tell runs apart (``a/log`` and ``b/log`` become ``a-log``, ``b-log``)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["-".join(p[-depth:]).lstrip("/") or "/" for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same run directory is given twice: {[str(d) for d in run_dirs]}")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: ``zerosum, gamma 1.0`` (``baseline`` for strategy none or gamma 0),
    plus the run's name where two runs would otherwise get the same label."""
    names = run_names(run_dirs)
    labels = []
    for name, run_dir in zip(names, run_dirs):
        info = read_run_info(run_dir)
        if "strategy" not in info:
            labels.append(name)
        elif info["strategy"] == "none" or info.get("gamma") == 0:
            labels.append("baseline (no Excitation)")
        else:
            labels.append(f"{info['strategy']}, gamma {info.get('gamma', 1.0):g}")
    return [f"{label} [{name}]" if labels.count(label) > 1 and label != name else label
            for label, name in zip(labels, names)]


def make_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {name: read_metrics(d) for name, d in zip(run_names(run_dirs), run_dirs)}
    labels = dict(zip(runs, run_labels(run_dirs)))
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in runs.items():
        steps, loss = _series(records, "loss")
        line = ax.plot(steps, loss, label=f"{labels[name]} (train)", linewidth=1.2)[0]
        vsteps, vloss = _series(records, "val_loss")
        if vsteps:
            ax.plot(vsteps, vloss, "o--", color=line.get_color(), label=f"{labels[name]} (validation)")
        tsteps, tloss = _series(records, "test_loss")  # data.split with a test share: once, after the last step
        if tsteps:
            ax.plot(tsteps, tloss, "X", markersize=9, color=line.get_color(), label=f"{labels[name]} (test)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    heatmaps = {}  # run -> (steps, [T, L, E] load / ideal load)
    for name, records in runs.items():
        rows = [(r["step"], r["utilization_LE"]) for r in records if "utilization_LE" in r]
        if rows:
            heatmaps[name] = ([s for s, _ in rows], np.asarray([u for _, u in rows], dtype=float))
    if heatmaps:
        vmax = max(2.0, max(float(np.nanmax(u)) for _, u in heatmaps.values()))  # one scale for every picture
        scale = "load / ideal load\n(0 = dead, 1 = balanced; same scale for every run)"

        def draw(names: list[str], path: Path, title: str) -> None:
            layers = max(heatmaps[n][1].shape[1] for n in names)
            fig, axes = plt.subplots(layers, len(names), figsize=(1.5 + 5 * len(names), 1.6 + 1.4 * layers),
                                     squeeze=False, sharey=True)
            for col, name in enumerate(names):
                steps, util = heatmaps[name]
                for layer in range(util.shape[1]):
                    ax = axes[layer, col]
                    image = ax.imshow(util[:, layer, :].T, aspect="auto", origin="lower", cmap="magma", vmin=0,
                                      vmax=vmax, extent=(steps[0], steps[-1], -0.5, util.shape[2] - 0.5),
                                      interpolation="nearest")
                    if col == 0:
                        ax.set_ylabel(f"layer {layer}\nexpert")
                axes[0, col].set_title(labels[name] if len(names) > 1 else "", fontsize=10)
                axes[-1, col].set_xlabel("optimizer step")
            fig.colorbar(image, ax=axes.ravel().tolist(), label=scale)
            fig.suptitle(title)
            written.append(path)
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)

        if len(heatmaps) > 1:
            draw(list(heatmaps), out_dir / "utilization.png", "Expert utilization, runs side by side")
        for name in heatmaps:
            draw([name], out_dir / f"utilization_{name}.png", f"Expert utilization: {labels[name]}")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_multipliers = False
    for name, records in runs.items():
        steps, lo = _series(records, "excitation/multiplier_min")
        _, hi = _series(records, "excitation/multiplier_max")
        _, mean = _series(records, "excitation/multiplier_mean")
        if not steps or (min(lo) == max(hi) == 1.0):  # no Excitation in this run: nothing to draw
            continue
        any_multipliers = True
        line = ax.plot(steps, mean, label=f"{labels[name]}: mean", linewidth=1.2)[0]
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, label=f"{labels[name]}: min..max")
    if any_multipliers:
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("Excitation multiplier phi")
        ax.set_title("Multiplier range over all MoE layers")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "multipliers.png")
        fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written

"""``excitation-dist report``: PNG plots from runs' metrics.jsonl.

- ``loss.png``: training (and validation) loss of every run, side by side;
- ``utilization_<run>.png``: per-layer heatmap of expert load / ideal load over steps;
- ``multipliers.png``: the range (min..max) and mean of the multipliers over steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from excitation_dist.recipe.metrics_log import read_metrics


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


def make_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {name: read_metrics(d) for name, d in zip(run_names(run_dirs), run_dirs)}
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in runs.items():
        steps, loss = _series(records, "loss")
        line = ax.plot(steps, loss, label=f"{name} (train)", linewidth=1.2)[0]
        vsteps, vloss = _series(records, "val_loss")
        if vsteps:
            ax.plot(vsteps, vloss, "o--", color=line.get_color(), label=f"{name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    for name, records in runs.items():
        rows = [(r["step"], r["utilization_LE"]) for r in records if "utilization_LE" in r]
        if not rows:
            continue
        steps = [s for s, _ in rows]
        util = np.asarray([u for _, u in rows], dtype=float)  # [T, L, E]
        layers = util.shape[1]
        fig, axes = plt.subplots(layers, 1, figsize=(8, 1.6 + 1.4 * layers), squeeze=False, sharex=True)
        vmax = max(2.0, float(np.nanmax(util)))
        for layer in range(layers):
            ax = axes[layer, 0]
            image = ax.imshow(util[:, layer, :].T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax,
                              extent=(steps[0], steps[-1], -0.5, util.shape[2] - 0.5), interpolation="nearest")
            ax.set_ylabel(f"layer {layer}\nexpert")
        axes[-1, 0].set_xlabel("optimizer step")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / ideal load (0 = dead)")
        fig.suptitle(f"Expert utilization: {name}")
        written.append(out_dir / f"utilization_{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_multipliers = False
    for name, records in runs.items():
        steps, lo = _series(records, "excitation/multiplier_min")
        _, hi = _series(records, "excitation/multiplier_max")
        _, mean = _series(records, "excitation/multiplier_mean")
        if not steps:
            continue
        any_multipliers = True
        line = ax.plot(steps, mean, label=f"{name} mean", linewidth=1.2)[0]
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, label=f"{name} min..max")
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

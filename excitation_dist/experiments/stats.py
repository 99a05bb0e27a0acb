"""Statistics and result bookkeeping shared by the experiments: 95% confidence
intervals (Student t over seeds), paired differences over the same seeds,
verdicts worded from the interval, learning-rate selection on validation, and
the config-hash cache of per-run rows."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics
from pathlib import Path

from scipy import stats as _st


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student-t confidence interval (NaN-free input)."""
    vals = [float(v) for v in values]
    m = statistics.mean(vals)
    if len(vals) < 2:
        return m, float("nan"), float("nan")
    half = _st.t.ppf(0.5 + level / 2, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return m, m - half, m + half


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """Worded from the interval of (method - baseline): only a sign-definite
    interval earns "better" or "worse"."""
    if math.isnan(lo) or math.isnan(hi):
        return "too few seeds"
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "no difference detected"


def paired(method: dict[int, float], baseline: dict[int, float], higher_is_better: bool = True) -> dict:
    """Paired difference method - baseline over the seeds both have."""
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    if not diffs:
        return {"n": 0, "diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "verdict": "no paired seeds"}
    m, lo, hi = mean_ci(diffs)
    return {"n": len(diffs), "diff": m, "lo": lo, "hi": hi, "verdict": verdict(lo, hi, higher_is_better)}


def config_hash(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def fnum(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def best_lr(rows: list[dict], select_key: str, higher_is_better: bool = True) -> tuple[float, bool]:
    """The learning rate whose mean of ``select_key`` over seeds is best; and
    whether it sits at an end of the swept grid (then the grid may be too narrow)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        v = fnum(r[select_key])
        by_lr.setdefault(fnum(r["lr"]), []).append(v if not math.isnan(v) else (-math.inf if higher_is_better else math.inf))
    means = {lr: statistics.mean(v) for lr, v in by_lr.items()}
    pick = (max if higher_is_better else min)(means, key=lambda lr: means[lr])
    grid = sorted(means)
    return pick, pick in (grid[0], grid[-1]) and len(grid) > 1


def curves_at_best_lr(runs: list[dict], curves: list[dict], best: list[dict], setting_of=lambda r: r["setting"],
                      keep=lambda r: True) -> list[tuple[dict, dict]]:
    """(run, curve point) for every curve point of a kept run trained at its
    method's chosen learning rate (``best``: rows with setting, strategy, best_lr)."""
    by_hash = {r["hash"]: r for r in runs}
    chosen = {(b["setting"], b["strategy"]): b["best_lr"] for b in best}
    out = []
    for c in curves:
        r = by_hash.get(c["hash"])
        if r is not None and keep(r) and chosen.get((setting_of(r), r["strategy"])) == fnum(r["lr"]):
            out.append((r, c))
    return out


def fmt_ci(m: float, lo: float, hi: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(lo):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def fmt_diff(p: dict, scale: float = 1.0, digits: int = 1) -> str:
    if p["n"] == 0:
        return "-"
    if math.isnan(p["lo"]):
        return f"{p['diff'] * scale:+.{digits}f}"
    return f"{p['diff'] * scale:+.{digits}f} [{p['lo'] * scale:+.{digits}f}, {p['hi'] * scale:+.{digits}f}]"

"""Which Micro-MoE experiments results/README.md shows, in page order: their results directory, their section,
and for a rerun of cells at another length the grid it must cover before the page reads it.

``page`` loads an experiment with a ``grids`` entry only once none of those runs is missing (``missing``), so a
half-finished rerun never carries a verdict; ``plan`` prints the same grids as commands. One place for both, so
the page and the plan cannot disagree on what "complete" means. No torch here: the page imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from excitation_dist.experiments.stats import REPORT_SEEDS, SELECT_SEEDS, fnum, read_csv

EVERY_METHOD = ("none", "zerosum", "positivesum", "expdiff", "global", "inverted", "random")
NO_EXPDIFF = ("none", "zerosum", "positivesum", "global", "inverted", "random")
SEEDS = tuple(REPORT_SEEDS) + tuple(SELECT_SEEDS)  # a rerun cell runs the report and the selection seeds


@dataclass(frozen=True)
class Grid:
    why: str  # plan's line for it
    strategies: tuple[str, ...]
    lrs: tuple[float, ...]


@dataclass(frozen=True)
class MicroExperiment:
    key: str  # page's name for it (comparisons' "exp")
    dir: str  # under results/
    section: str  # its section on results/README.md
    epochs: int  # epochs per run
    settings: tuple[str, ...] = ()  # the settings the rerun covers
    grids: tuple[Grid, ...] = ()  # what must have run before the page reads it (empty: always read)


MICRO = (
    MicroExperiment("micro", "micro_moe", "1", 30),
    MicroExperiment("long", "micro_moe_long", "1b", 150, ("sgd batch 512",), (
        Grid("SGD batch 512, 150 epochs: ExpDiff (1b has the others)", ("expdiff",),
             (0.0032, 0.0057, 0.01, 0.018, 0.032, 0.057)),
        Grid("SGD batch 512, 150 epochs: inverted and random", ("inverted", "random"),
             (0.1, 0.18, 0.32, 0.57, 1, 1.8, 3.2)))),
    MicroExperiment("b16_long", "micro_moe_b16_long", "1c", 90, ("sgd batch 16",), (
        Grid("SGD batch 16 ExpDiff: still improving and at the top edge of its grid: 90 epochs, grid up",
             EVERY_METHOD, (0.0022, 0.0047, 0.01, 0.022, 0.047, 0.1, 0.22, 0.47)),)),
    MicroExperiment("depth", "structural_confusion", "2", 30),
    MicroExperiment("depth_long", "structural_confusion_long", "2b", 150, ("depth 4", "depth 6"), (
        Grid("structural confusion depth 4 and 6, 150 epochs (1,350 steps), every method and control", NO_EXPDIFF,
             (0.1, 0.22, 0.46, 1.0, 2.2)),
        Grid("structural confusion depth 4 and 6, 150 epochs: ExpDiff on its lower grid", ("expdiff",),
             (0.00046, 0.001, 0.0022, 0.0046, 0.01, 0.022)))),
)
BY_KEY = {e.key: e for e in MICRO}
BY_DIR = {e.dir: e for e in MICRO}


def missing_runs(results: Path, d: str, settings, epochs: int, strategies, lrs, seeds) -> int:
    """How many (setting, method, lr, seed) runs of the grid are not yet in results/d/runs.csv."""
    have = {(r["setting"], r["strategy"], fnum(r["lr"]), int(r["seed"]))
            for r in read_csv(results / d / "runs.csv") if int(r["epochs"]) == epochs}
    return sum((s, m, float(lr), int(k)) not in have
               for s in settings for m in strategies for lr in lrs for k in seeds)


def missing(results: Path, exp: MicroExperiment) -> int:
    """Runs of ``exp``'s grids not yet in its runs.csv (0 for an experiment without grids)."""
    return sum(missing_runs(results, exp.dir, exp.settings, exp.epochs, g.strategies, g.lrs, SEEDS)
               for g in exp.grids)


def on_page(results: Path) -> list[MicroExperiment]:
    """The experiments the page reads: those without a rerun grid, and the reruns whose grids have all run."""
    return [e for e in MICRO if (results / e.dir / "runs.csv").is_file() and missing(results, e) == 0]


# The GPT-MoE sweeps with a test split: lm_sweep's grid for each (its refined points, same-lr and untuned-lr runs
# are ``plan.lm_followups``); the page reads ``LM_HELDOUT`` once this grid and its report runs are complete.
LM_COMMON = {"split": "96,2,2", "strategies": ["none", "zerosum", "positivesum", "global"],
             "balancing": ["aux:0.01", "aux:0", "bias"], "select": [0, 6], "report": [1, 2, 3, 4, 5]}
LM_HELDOUT = {**LM_COMMON, "out": "lm_heldout", "steps": 1500, "evals": 12, "lrs": [0.001, 0.0022, 0.0046, 0.01]}
LM_HELDOUT_LONG = {**LM_COMMON, "out": "lm_heldout_long", "steps": 6000, "evals": 12,
                   "lrs": [0.001, 0.0022, 0.0046, 0.01]}

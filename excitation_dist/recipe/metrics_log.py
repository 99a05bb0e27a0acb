"""Training metrics to TensorBoard and to ``metrics.jsonl`` (rank 0 only).

Scalars go to both. The per-expert utilization and multiplier matrices
(``[L, E]``) go to ``metrics.jsonl`` (TensorBoard scalars cannot hold them),
which ``excitation-dist report`` turns into heatmaps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from excitation_dist.core import Excitation
from excitation_dist.strategies import utilization

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run.json"  # what the run is (strategy, gamma, ...), for report legends


def excitation_record(excitation: Excitation) -> dict[str, Any]:
    """Scalars of the last step plus the [L, E] utilization ratio (load / ideal)
    and multiplier matrices."""
    counts = excitation.last_counts_LE
    record: dict[str, Any] = dict(excitation.metrics())
    record["utilization_LE"] = (utilization(counts) * counts.shape[-1]).tolist()
    record["multipliers_LE"] = excitation.last_multipliers_LE.tolist()
    return record


class MetricsLogger:
    """Writes on rank 0; other ranks' calls do nothing.

    Args:
        log_dir: run directory (TensorBoard event files and metrics.jsonl).
        rank: this process's global rank.
        tensorboard: also write TensorBoard events (needs the tensorboard package).
        writer: an existing SummaryWriter-like object (e.g. Megatron's) to use instead.
        run_info: what the run is (``strategy``, ``gamma``, ``name``, ...), written to ``run.json``.
    """

    def __init__(self, log_dir: str | Path, rank: int = 0, tensorboard: bool = True, writer: Any = None,
                 run_info: dict[str, Any] | None = None) -> None:
        self.enabled = rank == 0
        self.log_dir = Path(log_dir)
        self._writer = writer
        self._file = None
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            (self.log_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1) + "\n")
        self._file = open(self.log_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard and writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in values.items()}
        if self._writer is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        self._file.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None and hasattr(self._writer, "close"):
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in step order (a resumed run's
    repeated steps keep the latest record)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (logging.dir of a train run)?")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty for runs logged before it existed)."""
    path = Path(run_dir) / RUN_INFO_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}

"""Training metrics to TensorBoard, Weights & Biases and ``metrics.jsonl`` (rank 0 only).

Every logged step (``logging.interval``) gets the scalars: loss, learning rate,
throughput and Excitation's statistics summarized over layers (``excitation/...``).
Every ``logging.layer_interval`` steps the per-layer detail is added: the statistics
of each layer (``excitation/layer_NN/...``, 11 per layer) and the ``[L, E]``
utilization and multiplier matrices; large models want those less often. Scalars go
to every writer; the matrices only to ``metrics.jsonl`` (writers take scalars),
which ``excitation-dist report`` turns into heatmaps.

The writers are anything with ``add_scalar(tag, value, step)`` (TensorBoard's
SummaryWriter, Megatron-LM's) or ``log(dict, step=)`` (a W&B run, Megatron-LM's
wandb writer): :class:`TensorBoardScalars` and :class:`WandbScalars` adapt them.
"""

from __future__ import annotations

import json
import os
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a record is made: the command line reads logs without it
    from excitation_dist.core import Excitation
    from excitation_dist.recipe.config import RunConfig, WandbConfig

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run.json"  # what the run is (strategy, gamma, ...), for report legends
WANDB_RUN_ID_FILE = "wandb-run-id"  # a restarted run continues the same W&B run
MATRICES = ("utilization_LE", "multipliers_LE")
_LAYER_KEY = re.compile(r"/layer_\d+/")


def _is_scalar_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor exists in a process that has not imported torch
    return torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1


def is_layer_detail(key: str) -> bool:
    """Per-layer statistics (``.../layer_NN/...``) and the ``[L, E]`` matrices."""
    return key in MATRICES or _LAYER_KEY.search(key) is not None


def layers_due(step: int, layer_interval: int | None) -> bool:
    """Whether a logged ``step`` also gets the per-layer detail (``None``: every logged step)."""
    return layer_interval is None or step % layer_interval == 0


def excitation_record(excitation: Excitation, per_layer: bool = True) -> dict[str, Any]:
    """Scalars of the last step summarized over layers; with ``per_layer`` also each
    layer's and the [L, E] utilization ratio (load / ideal) and multiplier matrices."""
    from excitation_dist.strategies import utilization

    record: dict[str, Any] = dict(excitation.metrics(per_layer=per_layer))
    if per_layer:
        counts = excitation.last_counts_LE
        record["utilization_LE"] = (utilization(counts) * counts.shape[-1]).tolist()
        record["multipliers_LE"] = excitation.last_multipliers_LE.tolist()
    return record


class TensorBoardScalars:
    """Scalars to ``writer.add_scalar`` (a SummaryWriter). ``owned``: closed with the logger
    (False for a writer another framework owns, such as Megatron-LM's)."""

    def __init__(self, writer: Any, owned: bool = True) -> None:
        self.writer, self.owned = writer, owned

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.owned:
            self.writer.close()


class WandbScalars:
    """Scalars to ``run.log(dict, step=step)``, one call per step (a W&B run, or the
    ``wandb`` module Megatron-LM's ``get_wandb_writer`` returns). ``owned``: finished
    with the logger."""

    def __init__(self, run: Any, owned: bool = True) -> None:
        self.run, self.owned = run, owned

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        if self.owned:
            self.run.finish()


def open_wandb_run(config: WandbConfig, log_dir: Path, run_name: str, run_config: dict[str, Any]) -> Any:
    """A W&B run for ``config`` with its files under ``log_dir/wandb``; a restart in the same
    ``log_dir`` resumes the W&B run it started (its id is kept in ``log_dir/wandb-run-id``)."""
    import wandb

    id_file = log_dir / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=config.project, entity=config.entity, name=config.name or run_name, mode=config.mode,
                     dir=str(log_dir), config=run_config, id=run_id, resume="allow" if run_id else None)
    id_file.write_text(run.id + "\n")
    return run


class MetricsLogger:
    """Writes on rank 0; other ranks' calls do nothing.

    Args:
        log_dir: run directory (TensorBoard event files, metrics.jsonl, W&B's files).
        rank: this process's global rank.
        tensorboard: also write TensorBoard events (needs the tensorboard package).
        writer: an existing SummaryWriter-like object (e.g. Megatron's) to use instead.
        run_info: what the run is (``strategy``, ``gamma``, ``name``, ...), written to ``run.json``.
        layer_interval: steps between per-layer details (:func:`layers_due`); None: every logged step.
        wandb: a W&B run (or anything with ``log(dict, step=)``) to write the scalars to as well;
            finished by :meth:`close`.
        start_step: the step this run trains on from (0 fresh, S resumed from step S): records of
            later steps in ``metrics.jsonl`` (a killed attempt's, redone now) are dropped, and
            ``dropped`` says how many. None: append to the file as it is.
    """

    def __init__(self, log_dir: str | Path, rank: int = 0, tensorboard: bool = True, writer: Any = None,
                 run_info: dict[str, Any] | None = None, layer_interval: int | None = None, wandb: Any = None,
                 start_step: int | None = None) -> None:
        self.enabled = rank == 0
        self.log_dir = Path(log_dir)
        self.layer_interval = layer_interval
        self._writers: list[TensorBoardScalars | WandbScalars] = []
        self._file = None
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            (self.log_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1) + "\n")
        if start_step is not None:
            self.dropped = drop_records_after(self.log_dir, start_step)
        self._file = open(self.log_dir / METRICS_FILE, "a", buffering=1)
        if writer is not None:
            self._writers.append(TensorBoardScalars(writer, owned=True))
        elif tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier events of the steps this run redoes
            purge = None if start_step is None else start_step + 1
            self._writers.append(TensorBoardScalars(SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)))
        if wandb is not None:
            self._writers.append(WandbScalars(wandb))

    dropped = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, rank: int, start_step: int | None = None) -> MetricsLogger:
        """The recipe's logger: ``cfg.logging`` (directory, layer interval, W&B) and what the run is."""
        from excitation_dist.recipe.schema import to_dict

        run_info = {"name": cfg.name, "backend": cfg.backend, "strategy": cfg.excitation.strategy,
                    "gamma": cfg.excitation.gamma, "seed": cfg.seed}
        wandb_run = None
        if rank == 0 and cfg.logging.wandb.project is not None:
            log_dir = Path(cfg.logging.dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            wandb_run = open_wandb_run(cfg.logging.wandb, log_dir, cfg.name, to_dict(cfg))
        return cls(cfg.logging.dir, rank, run_info=run_info, layer_interval=cfg.logging.layer_interval, wandb=wandb_run,
                   start_step=start_step)

    def layers_due(self, step: int) -> bool:
        return layers_due(step, self.layer_interval)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Write ``values`` of ``step``; the per-layer detail among them only on :meth:`layers_due` steps."""
        if not self.enabled:
            return
        keep_layers = self.layers_due(step)
        clean = {k: (v.item() if _is_scalar_tensor(v) else v)
                 for k, v in values.items() if keep_layers or not is_layer_detail(k)}
        scalars = {k: v for k, v in clean.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for writer in self._writers:
            writer.write(step, scalars)
        self._file.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for writer in self._writers:
            writer.close()
        self._writers = []


def drop_records_after(run_dir: str | Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` without its records of steps after ``step`` (atomically);
    returns how many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


def logged_steps(run_dir: str | Path) -> tuple[int, int] | None:
    """(first, last) step of the records in ``metrics.jsonl``; None when there are none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return (min(steps), max(steps)) if steps else None


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

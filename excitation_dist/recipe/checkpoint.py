"""Atomic checkpoint directories, for any backend.

A checkpoint is written into ``ROOT/.staging-step_NNNNNNNN`` (by all ranks, on a
shared filesystem), then rank 0 marks it complete, renames it to
``ROOT/step_NNNNNNNN`` and atomically rewrites ``ROOT/latest``. A run killed
while saving leaves only a staging directory, which is never loaded and is
removed by the next save: no checkpoint ever loads half-written.

The ``COMPLETE`` marker is a JSON object: the step, and what a resume must agree
with (:func:`resume_metadata`: backend, model architecture, Excitation's
configuration and whether its state is inside, parallel layout, precision, and
the data position: samples consumed and everything the sample order depends on,
:func:`excitation_dist.recipe.data.data_record`).
:func:`excitation_dist.recipe.preflight.resume_check` compares it with the
run's configuration before any rank starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
METADATA_VERSION = 1  # "resume_metadata" in COMPLETE; absent in checkpoints written before the resume checks


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def resume_metadata(cfg: Any, *, excitation_state: bool, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must agree with, for ``CheckpointManager.publish``:
    ``cfg`` is the :class:`~excitation_dist.recipe.config.RunConfig` that wrote
    the checkpoint; ``excitation_state`` whether the backend saved Excitation's
    state (its step counter and EMA); ``data`` the run's data position
    (``TokenSource.record``: a resume reads on from its consumed samples, and is
    refused where the sample order would change). ``excitation`` is None when
    Excitation is off (strategy ``none``); ``data`` is left out when not given
    (a checkpoint without it resumes at ``step x global_batch_size``)."""
    p = cfg.parallel
    metadata = {
        "resume_metadata": METADATA_VERSION,
        "backend": cfg.backend,
        "model": _plain(asdict(cfg.model)),
        "excitation": None if cfg.excitation.strategy == "none" else _plain(asdict(cfg.excitation)),
        "excitation_state": bool(excitation_state),
        "parallel": {"world_size": p.world_size, "data_parallel": p.data_parallel,
                     "tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                     "context_parallel": p.context_parallel, "expert_parallel": p.expert_parallel,
                     "expert_tensor_parallel": p.expert_tensor_parallel, "zero_stage": p.zero_stage},
        "precision": cfg.precision,
        "world_size": p.world_size,
    }
    if data is not None:
        metadata["data"] = _plain(data)
    return metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path/COMPLETE`` (raises OSError / ValueError)."""
    data = json.loads((Path(path) / COMPLETE).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{Path(path) / COMPLETE} does not hold a JSON object")
    return data


def holds_excitation_state(metadata: dict[str, Any]) -> bool | None:
    """Whether the checkpoint holds Excitation state a run with Excitation on
    can resume: False when it was written with Excitation off or without the
    state, None when its metadata predates the resume checks."""
    if "resume_metadata" not in metadata:
        return None
    return metadata.get("excitation") is not None and bool(metadata.get("excitation_state"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Checkpoint directories under ``root``; keeps the ``keep_last`` newest."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def staging_dir(self, step: int) -> Path:
        """Where every rank writes the checkpoint of ``step`` (call on all ranks;
        rank 0 should call :meth:`prepare` first)."""
        return self.root / f".staging-{self.name(step)}"

    def remove_leftovers(self) -> None:
        """Rank 0 of the run holding the directory: remove what interrupted saves left
        (staging directories, ``.latest.tmp<pid>`` files of a kill between the rename and
        the ``latest`` update). Nothing else writes here while the run holds the lock."""
        if not self.root.is_dir():
            return
        for leftover in self.root.glob(".staging-step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".latest.tmp*"):
            leftover.unlink(missing_ok=True)

    def prepare(self, step: int) -> Path:
        """Rank 0, before a save: clear leftovers of interrupted saves and
        create the staging directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        staging = self.staging_dir(step)
        staging.mkdir(parents=True)
        return staging

    def publish(self, step: int, metadata: dict | None = None) -> Path:
        """Rank 0, after every rank finished writing (barrier first): mark the
        staging directory complete and make it the latest checkpoint."""
        staging = self.staging_dir(step)
        if not staging.is_dir():
            raise FileNotFoundError(f"{staging} does not exist: call prepare() and write the checkpoint first")
        _write_atomic(staging / COMPLETE, json.dumps({"step": step, **(metadata or {})}))
        final = self.root / self.name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / "latest", self.name(step) + "\n")
        self._prune()
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / COMPLETE).is_file():
                return candidate
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    @staticmethod
    def step_of(path: Path) -> int:
        return read_metadata(path)["step"]

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

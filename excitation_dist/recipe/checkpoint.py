"""Atomic checkpoint directories, for any backend.

A checkpoint is written into ``ROOT/.staging-step_NNNNNNNN`` (by all ranks, on a
shared filesystem), then rank 0 marks it complete, renames it to
``ROOT/step_NNNNNNNN`` and atomically rewrites ``ROOT/latest``. A run killed
while saving leaves only a staging directory, which is never loaded and is
removed by the next save: no checkpoint ever loads half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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

    def prepare(self, step: int) -> Path:
        """Rank 0, before a save: clear leftovers of interrupted saves and
        create the staging directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".staging-step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
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
        return json.loads((Path(path) / COMPLETE).read_text())["step"]

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

"""One run per checkpoint directory.

A run holds an exclusive ``flock`` on ``CHECKPOINT_DIR/.lock`` for as long as
it lives; the file names the holder (host, pid, start time, command). The
kernel drops the lock when the holder dies, however it dies, so a lock is never
stale. A second run on the same directory is refused with the holder's host and
pid instead of racing it for ``latest``.

Who holds it: ``excitation-dist train`` started by hand takes the lock before it
execs torchrun (same pid, the descriptor is inherited), and tells its ranks in
``EXCITATION_CHECKPOINT_LOCK``; under any other launcher (torchrun, the
DeepSpeed launcher, srun) global rank 0 takes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
HELD_BY_LAUNCHER_ENV = "EXCITATION_CHECKPOINT_LOCK"  # "host:pid" of the launcher holding the lock for its ranks


class CheckpointLocked(RuntimeError):
    """Another live run holds the checkpoint directory."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float = 0.0
    command: str = ""

    @property
    def key(self) -> str:
        return f"{self.host}:{self.pid}"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "unknown time"
        return f"pid {self.pid} on host {self.host} (started {when}: {self.command or '?'})"


def _this_process() -> Holder:
    argv = ["excitation-dist" if sys.argv[0].endswith(("cli.py", "excitation-dist")) else sys.argv[0], *sys.argv[1:]]
    return Holder(socket.gethostname(), os.getpid(), time.time(), " ".join(argv))


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        data = json.loads(raw.decode())
        return Holder(str(data["host"]), int(data["pid"]), float(data.get("started", 0.0)), str(data.get("command", "")))
    except (ValueError, KeyError, TypeError):
        return None


def locked_by(directory: str | Path) -> Holder | None:
    """The live run holding ``directory``'s lock, or None if it is free (or does not exist)."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return _read_holder(fd) or Holder("unknown host", -1)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def held_by_our_launcher(directory: str | Path) -> bool:
    """True when the lock is held by the launcher that started this process
    (``EXCITATION_CHECKPOINT_LOCK`` names it)."""
    holder = locked_by(directory)
    return holder is not None and holder.key == os.environ.get(HELD_BY_LAUNCHER_ENV)


def locked_message(directory: str | Path, holder: Holder) -> str:
    return (f"checkpoint.dir: {directory} is in use by another run, {holder.describe()}; wait for it to finish, "
            f"stop it (kill {holder.pid} on {holder.host}), or set checkpoint.dir to another directory")


class RunLock:
    """The exclusive lock of one checkpoint directory; released by :meth:`release`
    or when the process (and every process that inherited it) exits."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.fd: int | None = None
        self.holder: Holder | None = None

    def acquire(self, *, inheritable: bool = False) -> "RunLock":
        """Take the lock or raise :class:`CheckpointLocked` naming the holder.
        ``inheritable``: keep it across ``exec`` (the launcher execs torchrun)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd) or Holder("unknown host", -1)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLocked(locked_message(self.directory, holder)) from None
            raise
        self.holder = _this_process()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self.holder.__dict__).encode())
        os.fsync(fd)
        os.set_inheritable(fd, inheritable)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

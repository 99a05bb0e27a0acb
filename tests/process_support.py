"""Processes a killed run leaves behind.

A rank SIGKILLed by a test leaves its own children running: megatron-core's
``dist_checkpointing`` starts a ``multiprocessing`` Manager (spawn) per rank at
its first save, which outlives the rank (reparented, idle, ~270 MB each) unless
it is killed too. :func:`tag_runs` marks every process a test starts (through
the environment they inherit) and kills the marked ones that are still alive
when the test ends.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from excitation_dist.recipe.parent_watch import _ppid_of

TAG = "EXCITATION_TEST_RUN_TAG"


def tagged(tag: str) -> list[int]:
    """Pids of the processes whose environment holds ``TAG=tag``, this process and its own children
    excluded: a run the test started is killed by the test, and what this process starts for itself
    during the test (run_distributed's forkserver and resource tracker) serves later tests too."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _ppid_of(int(entry.name)) not in (
                    None, os.getpid()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            pass
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process tagged ``tag``; the pids killed."""
    pids = tagged(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def tag_runs(monkeypatch):
    """Generator body of an autouse fixture: tag this test's child processes, kill what is left of them after it."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    yield tag
    kill_tagged(tag)


def free_port() -> int:
    """A TCP port free on this host now, for a launcher that needs one named (``--master_port``,
    ``MASTER_PORT``): a fixed port would collide with another test's run under ``pytest -n``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

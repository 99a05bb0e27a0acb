"""Training ranks die with their launcher.

A rank whose launcher (torchrun's agent, the DeepSpeed launcher, or
``excitation-dist train`` itself) was killed would otherwise keep training
into the same checkpoint directory, or hang in a collective. On Linux the
kernel sends the rank SIGKILL when its parent exits (``PR_SET_PDEATHSIG``);
elsewhere a daemon thread polls the parent pid once a second.

Under the DeepSpeed launcher the parent is its per-node
``deepspeed.launcher.launch`` process, which outlives a killed ``deepspeed``
command (it is reparented and keeps its ranks training): there the rank also
watches its grandparent, and exits when the launch process is orphaned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def _ppid_of(pid: int) -> int | None:
    """The parent of ``pid`` (Linux ``/proc``), None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _watch_grandparent(parent: int, grandparent: int, interval_s: float) -> None:
    while _ppid_of(parent) == grandparent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_launcher(interval_s: float = 1.0) -> None:
    """:func:`exit_with_parent`; and when the parent is DeepSpeed's per-node launch process,
    also exit once that process loses its own parent (the ``deepspeed`` command, or pdsh's
    remote shell, was killed)."""
    exit_with_parent(interval_s)
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return
    grandparent = _ppid_of(parent)
    if grandparent is not None and grandparent > 1:
        threading.Thread(target=_watch_grandparent, args=(parent, grandparent, interval_s),
                         name="exit-with-deepspeed-runner", daemon=True).start()


def exit_with_parent(interval_s: float = 1.0) -> None:
    """Make this process exit (SIGKILL) as soon as its current parent exits.
    Nothing is lost: checkpoints are written atomically, and the launcher that
    died cannot collect results anyway."""
    parent = os.getppid()
    if parent == 1:  # already orphaned (or started by init): nothing to watch
        return
    if _set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)
        return
    threading.Thread(target=_watch, args=(parent, interval_s), name="exit-with-parent", daemon=True).start()

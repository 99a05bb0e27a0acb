"""Training ranks die with their launcher.

A rank whose launcher (torchrun's agent, the DeepSpeed launcher, or
``excitation-dist train`` itself) was killed would otherwise keep training
into the same checkpoint directory, or hang in a collective. On Linux the
kernel sends the rank SIGKILL when its parent exits (``PR_SET_PDEATHSIG``);
elsewhere a daemon thread polls the parent pid once a second.
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

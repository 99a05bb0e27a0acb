"""A finished rank leaves without tearing down torch's C++ objects at interpreter exit.

torch 2.13's ``DistributedDataParallel`` keeps its process group alive past
``destroy_process_group()``: after a DDP run and the destroy, a gloo rank still
has the group's ``pt_gloo_runloop`` worker threads and its ``gloo_tcp_loop``
(measured: a bare gloo group leaves none behind, one wrapped by DDP once does,
with the DDP module deleted and collected). Interpreter finalization then races
those threads, which still hold tensors: now and then (about 1 run in 20 to 100
of a two-node launch over gloo) a rank aborts after its last step with
``terminate called without an active exception`` (SIGABRT, no Python frame)
and its peer hangs in its own exit until the launcher gives up (pytorch/pytorch
PR 179291 and issue 190489 describe the same abort). The run itself was complete:
checkpoints, metrics and the process group were all closed.

:func:`leave` ends a rank whose training returned: it does the Python half of a
normal exit (joins non-daemon threads, runs ``atexit`` handlers, flushes the
standard streams) and then ``os._exit``, so no C++ destructor runs against a
half-finalized interpreter. A rank that fails still raises and exits normally.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """Exit this process with ``code`` after the Python-level shutdown, skipping interpreter finalization."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say
            pass
    os._exit(code)

"""Run a function in N processes joined by a gloo (or other) process group.

The pattern of OLMo-core's ``run_distributed_test``: the parent hosts a TCPStore
on a free port (port 0, so no race), spawns N processes that join it, and
raises one error that lists every rank's failure (traceback, exit code or
time-out). Functions and arguments must be picklable (module-level functions).

    from excitation_dist.testing import run_distributed

    def check(x):
        import torch.distributed as dist
        ...
        return dist.get_rank()

    assert run_distributed(check, 4, 1.0) == [0, 1, 2, 3]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_HOST = "127.0.0.1"
_PRELOAD = ["torch", "torch.distributed"]  # what the forkserver imports before it forks a rank


def _context() -> mp.context.BaseContext:
    """Processes forked from one server that has imported torch (the first call starts it; it
    serves every later call of this process): a rank starts without paying torch's import
    (1.3-1.9 CPU-s). Nothing else is preloaded: what a test sets in the environment (the
    ``env`` argument) is in place before any framework the rank imports reads it."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class DistributedTestError(AssertionError):
    """One or more ranks failed; the message holds each rank's report."""


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple,
    kwargs: dict,
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": _HOST,
            "MASTER_PORT": str(port),
        }
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timedelta(seconds=120))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        try:
            value = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report everything, including assertion errors and SystemExit
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return each rank's
    return value (index = rank). Raises :class:`DistributedTestError` naming
    every rank that raised, crashed or timed out."""
    import torch.distributed as dist

    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False)
    ctx = _context()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, store.port, backend, args, kwargs, dict(env or {}), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(reports) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.5)
            reports[rank] = (ok, value)
            if not ok:  # one failure usually hangs the others in a collective: give them a moment, then stop
                deadline = min(deadline, time.monotonic() + 15.0)
        except queue_lib.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join()
    del store

    failures = []
    for rank, p in enumerate(procs):
        if rank not in reports:
            why = f"exit code {p.exitcode}" if p.exitcode not in (None, -9) else f"no result within {timeout:.0f} s"
            failures.append(f"--- rank {rank}: {why}")
        elif not reports[rank][0]:
            failures.append(f"--- rank {rank} raised:\n{reports[rank][1]}")
    if failures:
        raise DistributedTestError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
    return [reports[r][1] for r in range(world_size)]

"""Several tests' distributed jobs in one spawned process group.

Each ``run_distributed`` call starts its processes afresh, and each of them imports
torch and the framework (DeepSpeed, megatron-core) again: on 2 cores that is 5-15 s
per call before a test does anything. A module-scoped fixture runs the jobs of
several tests (the parametrized cases of one matrix, or tests of one world size)
in one call with :func:`run_jobs`, and each test asserts on its own job's result.

A job that raises ends the whole group (the other ranks would wait in a
collective); its rank's report names the job, and every test of the group
fails with that report (:func:`result`).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from excitation_dist.testing import DistributedTestError, run_distributed

Job = tuple[str, Callable[..., Any], tuple]


def run_jobs(jobs: list[Job]) -> dict[str, Any]:
    """Worker entry: run every job ``(name, fn, args)`` in order; ``{name: fn(*args)}``."""
    out = {}
    for name, fn, args in jobs:
        try:
            out[name] = fn(*args)
        except BaseException as exc:
            raise AssertionError(f"job {name!r} raised (the jobs after it did not run)") from exc
    return out


def run_batch(world_size: int, jobs: list[Job], **kwargs: Any) -> dict[str, list[Any]] | DistributedTestError:
    """``{name: [rank 0's result, rank 1's, ...]}`` of every job, run in one process group of
    ``world_size`` ranks (``run_distributed``'s keyword arguments); or the error, for :func:`result`."""
    if not jobs:
        return {}
    try:
        per_rank = run_distributed(run_jobs, world_size, jobs, **kwargs)
    except DistributedTestError as err:
        return err
    return {name: [r[name] for r in per_rank] for name, _, _ in jobs}


def result(batch: dict[str, list[Any]] | DistributedTestError, name: str) -> list[Any]:
    """Every rank's result of job ``name``; raises the group's error if it failed."""
    if isinstance(batch, DistributedTestError):
        raise batch
    return batch[name]


def selected(request: pytest.FixtureRequest, test: str, argname: str) -> list[Any]:
    """The values of parameter ``argname`` of test ``test`` (of the requesting module) that this
    session runs, in collection order: a fixture runs only the jobs of selected tests (`make test-fast`
    picks single cases)."""
    values: list[Any] = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and getattr(item, "originalname", None) == test:
            value = item.callspec.params[argname]
            if value not in values:
                values.append(value)
    return values


def runs(request: pytest.FixtureRequest, test: str) -> bool:
    """Whether this session runs test ``test`` (of the requesting module)."""
    return any(getattr(item, "module", None) is request.module and getattr(item, "originalname", None) == test
               for item in request.session.items)

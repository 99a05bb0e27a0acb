"""Count the collectives a piece of code issues, measured by the profiler.

torch's profiler records every c10d collective that reaches a process group
(Python calls and C++ callers such as DDP's reducer alike) as a
``record_param_comms`` event carrying the collective's name and input shapes.

Only those events are read from the profiler's raw results: ``prof.events()`` would
first build a Python ``FunctionEvent`` for every operator the block ran (about 1 s per
step of a small Megatron model on this CPU, most of a distributed test's time).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from torch.profiler import ProfilerActivity, profile

_COLLECTIVE_PREFIXES = ("gloo:", "nccl:")  # the c10d collectives, by the profiler event's name


@dataclass
class CollectiveLog:
    """Collectives seen: ``calls`` lists (name, input shapes) in issue order."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def count(self, name: str | None = None, shape: tuple[int, ...] | None = None) -> int:
        """Number of collectives, optionally only those named ``name`` (e.g.
        "allreduce") whose input shapes mention ``shape``."""
        n = 0
        for call_name, shapes in self.calls:
            if name is not None and name not in call_name:
                continue
            if shape is not None and str(list(shape)) not in shapes:
                continue
            n += 1
        return n

    def summary(self) -> Counter:
        return Counter(name for name, _ in self.calls)


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    log = CollectiveLog()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield log
    events = [e for e in prof.profiler.kineto_results.events() if e.name().startswith(_COLLECTIVE_PREFIXES)]
    for event in sorted(events, key=lambda e: (e.start_ns(), -e.end_ns())):  # issue order, as prof.events()
        log.calls.append((event.name(), str(event.shapes())))


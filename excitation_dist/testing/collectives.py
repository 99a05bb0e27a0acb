"""Count the collectives a piece of code issues, measured by the profiler.

torch's profiler records every c10d collective that reaches a process group
(Python calls and C++ callers such as DDP's reducer alike) as a
``record_param_comms`` event carrying the collective's name and input shapes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from torch.profiler import ProfilerActivity, profile


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
    for event in prof.events():
        if event.name.startswith("gloo:") or event.name.startswith("nccl:"):
            log.calls.append((event.name, str(event.input_shapes)))

"""Megatron-LM's ``--data-path`` blends and ``--split`` shares, parsed and checked
without reading any data or importing torch (the command line checks a config
with them before it launches anything).

Blends: ``"PREFIX"``, ``"W1 PREFIX1 W2 PREFIX2 ..."`` (weights, normalized), or
``"PREFIX1 PREFIX2"`` (weighted by their tokens), as one string or as a list of
the same items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from excitation_dist.data.errors import DataError

SPLIT_NAMES = ("training", "validation", "test")


@dataclass(frozen=True)
class Blend:
    prefixes: list[str]
    weights: list[float] | None  # None: in proportion to the prefixes' tokens

    def as_megatron(self) -> tuple[list[str], list[float] | None]:
        return list(self.prefixes), None if self.weights is None else list(self.weights)


def _number(item: str | float) -> float | None:
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    try:
        return float(item)
    except (TypeError, ValueError):
        return None


def parse_blend(spec: str | Sequence[str | float]) -> Blend:
    """``"W1 P1 W2 P2"``, ``"P1 P2"`` or ``"P"`` (or a list of those items) as a
    :class:`Blend`; raises :class:`DataError` saying which item does not parse."""
    items = spec.split() if isinstance(spec, str) else list(spec)
    if not items:
        raise DataError("is empty; give a dataset prefix, or a blend 'W1 PREFIX1 W2 PREFIX2'")
    numbers = [_number(item) for item in items]
    if not any(n is not None for n in numbers):
        prefixes, weights = [str(i) for i in items], None
    else:
        if len(items) % 2:
            raise DataError(f"{' '.join(map(str, items))!r} mixes weights and prefixes but has {len(items)} items; "
                            "a weighted blend is pairs 'W1 PREFIX1 W2 PREFIX2 ...'")
        prefixes, weights = [], []
        for i in range(0, len(items), 2):
            weight, prefix = numbers[i], items[i + 1]
            if weight is None:
                raise DataError(f"weight {items[i]!r} (item {i + 1}) is not a number; a weighted blend is pairs "
                                "'W1 PREFIX1 W2 PREFIX2 ...'")
            if not math.isfinite(weight) or weight <= 0:
                raise DataError(f"weight {items[i]!r} (item {i + 1}) must be a finite number > 0")
            if numbers[i + 1] is not None:
                raise DataError(f"item {i + 2} ({items[i + 1]!r}) should be the prefix after weight {items[i]!r}, "
                                "but is a number; a weighted blend is pairs 'W1 PREFIX1 W2 PREFIX2 ...'")
            prefixes.append(str(prefix))
            weights.append(weight)
    for prefix in prefixes:
        if prefix.endswith((".bin", ".idx")):
            raise DataError(f"{prefix} ends with {prefix[-4:]}; give the prefix prepare-data printed, without .bin/.idx")
    return Blend(prefixes, weights)


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split``: up to three comma-separated shares (training,
    validation, test), normalized; raises :class:`DataError`."""
    parts = [p.strip() for p in split.split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not shares or len(shares) > 3 or any(not math.isfinite(s) or s < 0 for s in shares):
        raise DataError(f"{split!r} is not up to three comma-separated shares >= 0 (training, validation, test), "
                        "e.g. 98,2,0")
    shares += [0.0] * (3 - len(shares))
    if shares[0] <= 0:
        raise DataError(f"{split!r} gives the training split no share")
    total = sum(shares)
    return [s / total for s in shares]


def split_ranges(split: str, sequences: int) -> list[tuple[int, int]]:
    """The sequence range [begin, end) of each split of a prefix with
    ``sequences`` sequences, rounded exactly as megatron-core rounds them."""
    shares, bounds = parse_split(split), [0.0]
    for s in shares:
        bounds.append(bounds[-1] + s)
    return [(int(round(bounds[i] * sequences)), int(round(bounds[i + 1] * sequences))) for i in range(3)]

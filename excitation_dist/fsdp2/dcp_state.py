"""Excitation's state as one item of a ``torch.distributed.checkpoint`` (DCP) state dict.

The state is small and identical on every rank (the counts are all-reduced), so it
goes in as one ``BytesIO`` item (DCP writes it once); at load DCP hands back either
the bytes it wrote or the object they unpickle to. Used by the recipe's ``fsdp2``
backend and the torchtitan optimizer container.
"""

from __future__ import annotations

import io
from typing import Any

import torch


def pack(state: dict[str, Any]) -> io.BytesIO:
    """``state`` as one DCP item."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def unpack(item: Any) -> dict[str, Any]:
    """The state dict of an item :func:`pack` wrote, as DCP's load returns it."""
    if isinstance(item, io.BytesIO):
        item.seek(0)
        item = torch.load(item, weights_only=False)
    return dict(item)

"""Package attributes imported on first use (PEP 562), so that importing a package for its
light parts (a config, a name list) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, namespace: dict[str, Any],
                    where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``where`` is imported from its module
    (``where[name]``) the first time it is asked for, then kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__

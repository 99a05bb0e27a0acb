"""Load the megatron-core CPU shims kept in the repository's ``patches/megatron_cpu``.

They are applied only when asked for: :func:`apply` (explicit), or
:func:`apply_if_requested` when ``EXCITATION_MEGATRON_CPU=1`` is set. Both
refuse a process that sees a CUDA device: on a GPU cluster megatron-core runs
unpatched.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ENV = "EXCITATION_MEGATRON_CPU"
_PACKAGE = "_excitation_megatron_cpu_patches"
_DIR = Path(__file__).resolve().parents[2] / "patches" / "megatron_cpu"


def _load() -> ModuleType:
    if _PACKAGE in sys.modules:
        return sys.modules[_PACKAGE]
    init = _DIR / "__init__.py"
    if not init.is_file():
        raise RuntimeError(
            f"the megatron-core CPU patches are not next to this package ({_DIR} is missing); "
            "install excitation_dist from a source checkout (pip install -e .) to train Megatron on CPU"
        )
    spec = importlib.util.spec_from_file_location(_PACKAGE, init, submodule_search_locations=[str(_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def apply(*, training_loop: bool = False) -> dict[str, str]:
    """Patch megatron-core to run on CPU over gloo; returns {patch: megatron-core version}.

    Call before building any megatron model (0.19.x: before importing megatron.core).
    ``training_loop``: also what Megatron-LM's ``pretrain`` needs (it then sees one
    pretend CUDA device; only for a process that runs ``pretrain`` on CPU).
    """
    import torch

    if not applied() and torch.cuda.is_available():
        raise RuntimeError(
            "refusing to apply the megatron-core CPU patches in a process that sees a GPU; "
            f"unset {ENV} and run megatron-core unpatched"
        )
    applied_now = _load().apply_all(training_loop)
    quiet_known_cpu_warnings()
    return applied_now


# What megatron-core (and torch under it) warns about on every CPU run, each expected there: no Transformer
# Engine or apex (local fallbacks), torch's deprecated names of the collectives megatron calls, a CUDA-graph default.
KNOWN_CPU_WARNINGS = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"full scope is deprecated",
)
WARNINGS_ENV = "EXCITATION_MEGATRON_WARNINGS"
_QUIETED: list[bool] = []


def quiet_known_cpu_warnings() -> bool:
    """Hide :data:`KNOWN_CPU_WARNINGS` (about 40 lines per CPU run) and say so in one line on
    rank 0, once per process (call it before megatron-core is imported: some warn at import);
    ``EXCITATION_MEGATRON_WARNINGS=all`` keeps them. Returns whether they are hidden."""
    import warnings

    if _QUIETED:
        return _QUIETED[0]
    _QUIETED.append(os.environ.get(WARNINGS_ENV) != "all")
    if not _QUIETED[0]:
        return False
    for pattern in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    if os.environ.get("RANK", "0") == "0":
        print("megatron-core on CPU: its known CPU warnings are not shown (no Transformer Engine or apex: local "
              f"fallbacks; torch's deprecated collective names); {WARNINGS_ENV}=all shows them", flush=True)
    return True


def apply_if_requested() -> dict[str, str]:
    """:func:`apply` when ``EXCITATION_MEGATRON_CPU=1``; otherwise nothing."""
    return apply() if os.environ.get(ENV) == "1" else {}


def checked_versions() -> list[str]:
    """The megatron-core versions every always-needed CPU patch was checked against
    (what the recipe and pretrain_gpt can run on CPU; the latter needs 0.19.x).

    Read from the patches' source (``PATCHES`` in the package ``__init__``; each module's
    ``CHECKED`` and whether it defines ``needed``), not imported: ``excitation-dist train``
    asks before it starts torchrun, and importing the patches imports torch (1.1 s)."""
    always = []
    for name in _names_in_tuple(_DIR / "__init__.py", "PATCHES"):
        assigned, functions = _top_level(_DIR / f"{name}.py")
        if "needed" not in functions:
            always.append(set(ast.literal_eval(assigned["CHECKED"])))
    return sorted(set.intersection(*always)) if always else []


def _top_level(path: Path) -> tuple[dict[str, ast.expr], set[str]]:
    """A module's top-level assignments (name -> value expression) and function names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    assigned = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    return assigned, {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def _names_in_tuple(path: Path, variable: str) -> list[str]:
    value = _top_level(path)[0][variable]
    if not isinstance(value, ast.Tuple) or not all(isinstance(e, ast.Name) for e in value.elts):
        raise RuntimeError(f"{path}: {variable} must be a tuple of the patch modules' names")
    return [e.id for e in value.elts]


def applied() -> dict[str, str]:
    return dict(sys.modules[_PACKAGE].APPLIED) if _PACKAGE in sys.modules else {}

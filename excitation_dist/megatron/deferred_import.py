"""Parts of megatron-core imported without running ``megatron/core/__init__.py`` first.

The recipe reads its data through megatron-core's own ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` on every backend. ``import
megatron.core.datasets.gpt_dataset`` runs the package's ``__init__`` first, and
that imports the model-parallel stack (tensor_parallel, Transformer Engine's
extension, the inference contexts and W&B when it is installed) and, through
megatron's jit fusions, ``torch.compile``'s inductor: 3.7 CPU-seconds per
process on top of torch, measured here, paid by every rank of the torch,
FSDP2 and DeepSpeed backends that use none of it. The dataset modules
themselves need only ``megatron.core.utils``, ``parallel_state`` and the
tokenizer base classes: 0.9 CPU-seconds.

The doors below import modules under a placeholder ``megatron.core`` package
(the real one's spec and ``__path__``, its ``__init__`` not run) and never
leave it behind:

- :func:`dataset_modules` imports the dataset modules, then takes the
  placeholder and every ``megatron.core`` module imported under it out of
  ``sys.modules`` again: the recipe keeps its own copies of the dataset
  modules (they use ``torch.distributed`` directly, no megatron state), and a
  later ``import megatron.core`` in the same process imports the whole
  package afresh, in its own order.
- :func:`dataset_scope` puts those modules back in ``sys.modules`` while the
  datasets are built: megatron imports its C++ ``helpers`` inside the
  functions that build an index, which would otherwise import the whole
  package on the rank that builds it.
- :func:`before_package_init` yields modules imported under the placeholder,
  then runs the real ``__init__`` in it: the CPU patch ``jit_eager`` switches
  megatron's jit fuser off there, before the fused modules are imported.

Where ``megatron.core`` is already imported, all three are plain imports.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from typing import Iterator

# The modules build_gpt_datasets and the indexed writer use (megatron-core 0.16.1 - 0.19.x).
DATASET_MODULES = ("megatron.core.datasets.blended_megatron_dataset_builder", "megatron.core.datasets.gpt_dataset",
                   "megatron.core.datasets.indexed_dataset")
_PACKAGE = "megatron.core"
# megatron.core.utils imports parallel_state, which imports names from utils: the package __init__ resolves the
# cycle by importing parallel_state first, and so does the placeholder.
_FIRST = "megatron.core.parallel_state"
# Imported inside megatron's dataset functions (``from megatron.core.datasets import helpers`` when an index is built):
# imported under the placeholder too, and put back in reach while the datasets are built (dataset_scope).
_LAZY = ("megatron.core.datasets.helpers",)
_DATASETS: dict[str, types.ModuleType] = {}
_SCOPE: dict[str, types.ModuleType] = {}  # every megatron.core module imported under the placeholder, itself included


@contextlib.contextmanager
def quiet_megatron_import():
    """Import megatron-core without its warnings that Transformer Engine and Apex
    are missing: they concern its model code's fallbacks, not the dataset stack."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        yield


def _ours(name: str) -> bool:
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


@contextlib.contextmanager
def _placeholder() -> Iterator[types.ModuleType]:
    """``megatron.core`` as a bare package (``parallel_state`` imported) for the ``with`` block.
    Raises ImportError when megatron-core is not installed."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"No module named {_PACKAGE!r}")
    package = types.ModuleType(spec.name)
    package.__spec__, package.__loader__, package.__file__ = spec, spec.loader, spec.origin
    package.__path__, package.__package__ = list(spec.submodule_search_locations), spec.name
    parent = importlib.import_module("megatron")
    sys.modules[spec.name] = package
    parent.core = package
    try:
        importlib.import_module(_FIRST)
        yield package
    except BaseException:
        _forget()
        raise


def _forget() -> None:
    """Take ``megatron.core`` and its submodules out of ``sys.modules`` (and off the ``megatron`` package)."""
    for name in [name for name in sys.modules if _ours(name)]:
        del sys.modules[name]
    parent = sys.modules.get("megatron")
    if parent is not None and "core" in vars(parent):
        delattr(parent, "core")


def dataset_modules() -> dict[str, types.ModuleType]:
    """The modules of :data:`DATASET_MODULES`, by name, imported without megatron-core's package
    ``__init__`` unless it already ran. Raises ImportError when megatron-core is not installed."""
    with quiet_megatron_import():
        if _PACKAGE in sys.modules:
            return {name: importlib.import_module(name) for name in DATASET_MODULES}
        if not _DATASETS:
            with _placeholder():
                _DATASETS.update({name: importlib.import_module(name) for name in DATASET_MODULES})
                for name in _LAZY:
                    importlib.import_module(name)
                _SCOPE.update({name: module for name, module in sys.modules.items() if _ours(name)})
            _forget()  # the recipe holds its copies; megatron code imported later gets the whole package
        return dict(_DATASETS)


@contextlib.contextmanager
def dataset_scope() -> Iterator[None]:
    """Run the dataset modules of :func:`dataset_modules` with the modules they were imported with
    back in ``sys.modules`` for the block, and out again after it: megatron's dataset code imports
    ``helpers`` inside its functions (building an index), which would otherwise import the whole
    package (its ``__init__``, the model-parallel stack and W&B: about 2 CPU-seconds, on the rank
    that builds the index). A plain block where megatron-core is imported whole."""
    if _PACKAGE in sys.modules or not _SCOPE:
        yield
        return
    sys.modules.update(_SCOPE)
    importlib.import_module("megatron").core = _SCOPE[_PACKAGE]
    try:
        yield
    finally:
        _forget()


@contextlib.contextmanager
def before_package_init(names: tuple[str, ...]) -> Iterator[dict[str, types.ModuleType]]:
    """Yield the ``megatron.core`` submodules ``names`` imported before the package ``__init__``,
    which runs when the ``with`` block ends (a plain import where megatron-core is imported already)."""
    with quiet_megatron_import():
        if _PACKAGE in sys.modules:
            yield {name: importlib.import_module(name) for name in names}
            return
        with _placeholder() as package:
            yield {name: importlib.import_module(name) for name in names}
            with open(package.__spec__.origin, encoding="utf-8") as f:
                code = compile(f.read(), package.__spec__.origin, "exec")
            exec(code, package.__dict__)  # the installed package's own __init__, in the package

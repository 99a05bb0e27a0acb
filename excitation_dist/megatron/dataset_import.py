"""megatron-core's dataset stack (``megatron.core.datasets``), imported without
running ``megatron/core/__init__.py`` first.

The recipe reads its data through megatron-core's own ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` on every backend. ``import
megatron.core.datasets.gpt_dataset`` runs the package's ``__init__`` first, and
that imports the model-parallel stack (tensor_parallel, Transformer Engine's
extension, the inference contexts and W&B when it is installed) and, through
megatron's jit fusions, ``torch.compile``'s inductor: 3.7 CPU-seconds per
process on top of torch, measured here, paid by every rank of the torch,
FSDP2 and DeepSpeed backends that use none of it (a 2-rank run of the tiny
config spends 14 CPU-seconds in all). The dataset modules themselves need
only ``megatron.core.utils``, ``parallel_state`` and the tokenizer base
classes: 0.9 CPU-seconds.

:func:`dataset_modules` imports them under a placeholder ``megatron.core``
package (the real one's spec and ``__path__``) that runs the real ``__init__``
the first time anything asks it for a name the dataset modules did not load
(``from megatron.core import ModelParallelConfig``, ``megatron.core.mpu``,
``megatron.core.tensor_parallel``): megatron code imported later in the same
process sees the complete package. Where ``megatron.core`` is already imported
(the megatron backend, after its CPU patches) this is a plain import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings

# The modules build_gpt_datasets and the indexed writer use (megatron-core 0.16.1 - 0.19.x).
DATASET_MODULES = ("megatron.core.datasets.blended_megatron_dataset_builder", "megatron.core.datasets.gpt_dataset",
                   "megatron.core.datasets.indexed_dataset")
# megatron.core.utils imports parallel_state, which imports names from utils: the package __init__ resolves the
# cycle by importing parallel_state first, and so does the placeholder.
_FIRST = "megatron.core.parallel_state"


@contextlib.contextmanager
def quiet_megatron_import():
    """Import megatron-core without its warnings that Transformer Engine and Apex
    are missing: they concern its model code's fallbacks, not the dataset stack."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        yield


class _DeferredPackage(types.ModuleType):
    """``megatron.core`` whose ``__init__`` runs on the first name it does not have yet."""

    def __getattr__(self, name: str):
        # "loading": dataset_modules() is importing; a missing name is a submodule the import system loads next
        wanted = not name.startswith("__") or name in ("__all__", "__version__")
        if not wanted or self.__dict__.get("_excitation_init") is not None:  # None: deferred
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.complete()
        return getattr(self, name)

    def complete(self) -> None:
        """Run the real ``megatron/core/__init__.py`` in this module (once)."""
        if self.__dict__.get("_excitation_init") is not None:
            return
        self.__dict__["_excitation_init"] = "running"
        try:
            with open(self.__spec__.origin, encoding="utf-8") as f:
                code = compile(f.read(), self.__spec__.origin, "exec")
            with quiet_megatron_import():
                exec(code, self.__dict__)  # the installed package's own __init__
        except BaseException:
            self.__dict__["_excitation_init"] = None
            raise
        self.__dict__["_excitation_init"] = "done"


def dataset_modules() -> dict[str, types.ModuleType]:
    """The modules of :data:`DATASET_MODULES`, by name. Raises ImportError when
    megatron-core is not installed."""
    with quiet_megatron_import():
        if "megatron.core" not in sys.modules:
            spec = importlib.util.find_spec("megatron.core")
            if spec is None or spec.origin is None:
                raise ImportError("No module named 'megatron.core'")
            package = _DeferredPackage(spec.name)
            package.__dict__["_excitation_init"] = "loading"
            package.__spec__, package.__loader__, package.__file__ = spec, spec.loader, spec.origin
            package.__path__, package.__package__ = list(spec.submodule_search_locations), spec.name
            parent = importlib.import_module("megatron")
            sys.modules[spec.name] = package
            parent.core = package
            try:
                importlib.import_module(_FIRST)
                modules = {name: importlib.import_module(name) for name in DATASET_MODULES}
            except BaseException:
                del sys.modules[spec.name]
                del parent.core
                raise
            package.__dict__["_excitation_init"] = None  # deferred: the next missing name runs __init__
            return modules
        return {name: importlib.import_module(name) for name in DATASET_MODULES}


def complete_megatron_core() -> None:
    """Run megatron-core's package ``__init__`` now if :func:`dataset_modules` deferred it: code that
    uses megatron's models (its side effects included: torch's safe globals for checkpoint loads)
    calls this first, whatever the process read its data with."""
    package = sys.modules.get("megatron.core")
    if isinstance(package, _DeferredPackage):
        package.complete()

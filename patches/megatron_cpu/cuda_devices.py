"""CUDA device assumptions of megatron-core, redirected to the CPU.

megatron-core creates tensors with ``device="cuda"`` / ``torch.cuda.current_device()``
(schedules, optimizers, dispatchers), calls ``Tensor.cuda()``, compares
``Tensor.type()`` with ``"torch.cuda.FloatTensor"`` (optimizers, grad clipping)
and uses ``torch.cuda.Stream/Event/synchronize`` (all-to-all dispatcher). On a
machine without CUDA:

* a ``TorchFunctionMode`` rewrites every CUDA ``device=`` (string, device or
  ordinal) of a torch call to the CPU, makes ``Tensor.cuda()`` the identity and
  drops ``pin_memory`` (it needs CUDA);
* ``torch.cuda.current_device()`` returns the CPU device (backward functions
  run without torch function modes, so the mode cannot rewrite their
  ``device=torch.cuda.current_device()``), streams and events are no-ops,
  ``synchronize`` returns;
* ``Tensor.type()`` without arguments reports a CPU tensor under the CUDA type
  name megatron-core expects (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``).

Checked against megatron-core 0.16.1 and 0.19.2 with torch 2.13 (CPU build).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

from . import _common

_GRAD_GETTER = torch.Tensor.grad.__get__
NAME = "cuda_devices"
CHECKED = ("0.16.1", "0.19.2")


def _is_cuda(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA devices in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == _GRAD_GETTER:  # passed through untouched, without the non-leaf ``.grad`` warning, which the
            with warnings.catch_warnings():  # mode's frame would otherwise carry (megatron reads main_grad views)
                warnings.simplefilter("ignore", UserWarning)
                return func(*args)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoOpEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_DEFAULT_STREAM = _NoOpStream()
_MODE: CpuDeviceMode | None = None


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    global _MODE
    _MODE = CpuDeviceMode()
    _MODE.__enter__()  # stays active for the life of the process (this thread and autograd's CPU backward)

    # Not the ordinal 0: autograd runs backward functions without torch function modes, and
    # megatron's backward passes allocate with device=torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda *a, **k: _DEFAULT_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0

    original_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)  # may already be rewritten: the mode re-dispatches to this function
        if self.device.type != "cpu" or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type_name

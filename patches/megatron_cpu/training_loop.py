"""Megatron-LM's training loop (``megatron.training``, 0.19.x) on CPU.

``initialize_megatron`` asserts ``torch.cuda.is_available()``, the loop asks
for device counts, names, capabilities and memory statistics. For a process
that runs ``pretrain`` on CPU (and only there: applied on request, after the
device-rewriting patches) this reports one CUDA-like device whose numbers are
harmless, so the loop takes its ordinary path while every tensor stays on the
CPU.

Checked against megatron-core 0.19.2.
"""

from __future__ import annotations

import torch

from . import _common

NAME = "training_loop"
CHECKED = ("0.19.2",)


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_name = lambda *a, **k: "cpu"
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: type("Props", (), {"total_memory": 0, "name": "cpu", "major": 9, "minor": 0, "multi_processor_count": 1})()
    torch.cuda.mem_get_info = lambda *a, **k: (0, 0)
    torch.cuda.memory_reserved = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.memory_stats = lambda *a, **k: {}
    torch.cuda.ipc_collect = lambda *a, **k: None

"""apex's ``multi_tensor_adam`` CUDA kernel (DeepSpeed's copy: ``csrc/adam/multi_tensor_adam.cu``),
transcribed element for element in torch for this CPU-only machine, where the kernel
cannot be built. DeepSpeed's ``FusedAdam`` class runs unchanged on top of it (its
bookkeeping: state creation, step counters, groups, dtype lists); only the kernel is
replaced. Intermediates are float32 tensors (the kernel's float registers; nvcc may
contract multiply-adds, so agreement with the real kernel is to float32 rounding)."""

from __future__ import annotations

import types

import torch
from torch.utils._python_dispatch import _disable_current_modes

ADAM_MODE_0, ADAM_MODE_1 = 0, 1  # L2 regularization, decoupled weight decay


class Recorder:
    """Every tensor the kernel stepped (``stepped``: their data pointers)."""

    def __init__(self) -> None:
        self.stepped: list[int] = []


def multi_tensor_adam(recorder: Recorder):
    def kernel(*args):
        with _disable_current_modes():  # one launch of the real kernel: not counted as the torch ops below
            _kernel(*args)

    def _kernel(chunk_size, noop_flag, tensor_lists, lr, beta1, beta2, epsilon, step, mode, bias_correction, decay):
        beta1_correction = 1 - beta1**step if bias_correction == 1 else 1.0
        beta2_correction = 1 - beta2**step if bias_correction == 1 else 1.0
        f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # the kernel's float arguments
        lr, beta1, beta2, epsilon, decay = map(f32, (lr, beta1, beta2, epsilon, decay))
        beta1_correction, beta2_correction = f32(beta1_correction), f32(beta2_correction)
        for g, p, m, v in zip(*tensor_lists):
            recorder.stepped.append(p.data_ptr())
            r_g, r_p, r_m, r_v = g.float(), p.float(), m.float(), v.float()
            if mode == ADAM_MODE_0:
                r_g = r_g + decay * r_p
            r_m = beta1 * r_m + (1 - beta1) * r_g
            r_v = beta2 * r_v + (1 - beta2) * r_g * r_g
            denom = torch.sqrt(r_v / beta2_correction) + epsilon
            update = (r_m / beta1_correction) / denom
            if mode == ADAM_MODE_1:
                update = update + decay * r_p
            p.copy_(r_p - lr * update)
            m.copy_(r_m)
            v.copy_(r_v)

    return kernel


def install_deepspeed_fused_adam(monkeypatch) -> Recorder:
    """Make ``deepspeed.ops.adam.FusedAdam`` constructible on CPU with this kernel; returns its recorder."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import fused_adam

    recorder = Recorder()

    class Builder:
        def load(self):
            return types.SimpleNamespace(multi_tensor_adam=multi_tensor_adam(recorder))

    monkeypatch.setattr(fused_adam, "FusedAdamBuilder", Builder)
    return recorder

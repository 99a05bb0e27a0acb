"""DeepSpeed backend (DeepSpeed 0.19.x): Excitation for ``deepspeed.moe`` layers.

    import deepspeed, excitation_dist.deepspeed as exds

    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    excitation = exds.attach(engine, {"strategy": "positivesum"})
    for batch in data:                       # one call per micro-batch, as usual
        engine.backward(engine(batch))
        engine.step()                         # counts reduced once per optimizer step, expert updates scaled
    engine.save_checkpoint(d)                 # carries the Excitation state (client_state)

Supported: ZeRO stage 0/1/2, fp32/bf16/fp16 (incl. BF16_Optimizer and CPU
optimizer offload), client torch optimizers and config optimizers, gradient
accumulation, any ep_size, top-1/top-2/top-k gates. See :mod:`.backend` for
where each piece is wired and :mod:`.compat` for the DeepSpeed facts used.

On a machine without a GPU, importing this package stops DeepSpeed from
compiling its shared-memory all-reduce op (100-160 s on the first run; it only
serves inference all-reduce, which then falls back to torch.distributed), so
import it before ``deepspeed.initialize``. ``init_distributed()`` starts
torch.distributed the way DeepSpeed wants it on this machine (NCCL on GPUs,
gloo on CPU).
"""

import importlib.util
import os

from excitation_dist.deepspeed.backend import CLIENT_STATE_KEY, attach, attached, detach
from excitation_dist.deepspeed.compat import init_distributed, skip_cpu_shm_comm_build

__all__ = ["attach", "attached", "detach", "CLIENT_STATE_KEY", "init_distributed", "skip_cpu_shm_comm_build"]


def _skip_shm_build_without_gpu() -> None:
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # not another accelerator DeepSpeed found without CUDA
        skip_cpu_shm_comm_build()


_skip_shm_build_without_gpu()

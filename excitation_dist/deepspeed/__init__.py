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
"""

from excitation_dist.deepspeed.backend import CLIENT_STATE_KEY, attach, attached, detach

__all__ = ["attach", "attached", "detach", "CLIENT_STATE_KEY"]

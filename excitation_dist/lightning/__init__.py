"""PyTorch Lightning: Excitation as a callback.

Lightning's automatic optimization runs the forward and backward inside
``optimizer.step(closure)``; the controller counts the closure's tokens in the
step they belong to (see :meth:`excitation_dist.Excitation.hook_optimizer`), so
the callback only attaches the plain PyTorch backend once the strategy has
wrapped the model and built the optimizer::

    from excitation_dist.lightning import ExcitationCallback
    trainer = lightning.Trainer(..., callbacks=[ExcitationCallback({"strategy": "zerosum"})])

The model's MoE layers take part as in :mod:`excitation_dist.torch`
(``num_experts``, ``excitation_expert_slices()``, :func:`report_expert_counts`).
Checked with lightning 2.6 (single process and DDP, gradient accumulation);
one optimizer per LightningModule, automatic optimization.
"""

from excitation_dist.lightning.callback import ExcitationCallback

__all__ = ["ExcitationCallback"]

"""The Lightning callback that attaches Excitation at the start of training."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl

from excitation_dist.config import ExcitationConfig
from excitation_dist.core import Excitation
from excitation_dist.torch import attach, detach


class ExcitationCallback(pl.Callback):
    """Attach Excitation to the trainer's (possibly DDP-wrapped) model and its
    optimizer when fitting starts; detach when it ends. ``self.excitation`` is
    the controller (``metrics()``, ``state_dict()``) while fitting.

    With ``log_metrics``, logs Excitation's summaries over layers through the
    LightningModule's logger every ``trainer.log_every_n_steps`` optimizer steps
    (each read copies the counts and multipliers to the host, so not every step).
    """

    def __init__(self, config: ExcitationConfig | Mapping[str, Any] | None = None, *, log_metrics: bool = True) -> None:
        self.config = config
        self.log_metrics = log_metrics
        self.excitation: Excitation | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("ExcitationCallback supports automatic optimization; with manual optimization call "
                             "excitation_dist.torch.attach(model, optimizer) yourself")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"ExcitationCallback needs exactly one optimizer, the trainer has {len(trainer.optimizers)}")
        self.excitation = attach(trainer.strategy.model, trainer.optimizers[0], self.config)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.log_metrics and self.excitation is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log_dict(self.excitation.metrics(per_layer=False), rank_zero_only=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.excitation is not None:
            detach(trainer.strategy.model)
            self.excitation = None

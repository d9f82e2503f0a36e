"""Test-only callbacks for fault tests (PYTHONPATH=tests): kill or signal the training process at a given step,
or poison the weights so the losses become nan."""

from __future__ import annotations

import os
import signal
import time

import lightning.pytorch as L
import torch


class SignalAt(L.Callback):
    """At the start of the first batch with global_step >= step, send `signum` to this process."""

    def __init__(self, step: int, signum: int = int(signal.SIGKILL)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.5)  # let a handled signal arrive before the step runs


class PoisonAt(L.Callback):
    """At the start of the first batch with global_step >= step, set the discriminator's weights to nan."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step >= self.step:
            with torch.no_grad():
                for p in pl_module.discriminator.parameters():
                    p.fill_(float("nan"))

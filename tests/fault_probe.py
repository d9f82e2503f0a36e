"""Test-only callbacks for fault tests (PYTHONPATH=tests): kill or signal the training process at a given step,
or poison the weights so the losses become nan."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as L
import torch

from gangen import reliability


def signal_self(signum: int) -> None:
    """Send `signum` to this process; a handled one has been handled when this returns, or it fails loudly.

    The kernel delivers a signal a thread sends to its own process to that thread when it does not block it,
    and CPython runs the Python handler at once (os.kill checks for signals before it returns): gangen's
    handlers (reliability.Preemption) have noted a SIGTERM, SIGINT or SLURM requeue signal by the next line.
    SIGKILL ends the process inside os.kill."""
    os.kill(os.getpid(), signum)
    noted = reliability._received  # {"signum": SIGTERM / SIGINT, "requeue": SLURM's signal}
    if signum not in (noted.get("signum"), noted.get("requeue")):
        raise AssertionError(f"signal {signum} sent to this process, but no gangen handler has noted it: {noted}")


class SignalAt(L.Callback):
    """At the start of the first batch with global_step >= step, send `signum` to this process (to rank
    `rank`'s only, when given), once; with `attempt`, only in that attempt of a torchrun job (0: its first start,
    not the restarts, which run the same command again)."""

    def __init__(
        self, step: int, signum: int = int(signal.SIGKILL), rank: int | None = None, attempt: int | None = None
    ) -> None:
        self.step, self.signum, self.rank = step, signum, rank
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.sent = attempt is not None and attempt != restarts  # another attempt's: never sent

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank) and not self.sent:
            self.sent = True
            signal_self(self.signum)


class SignalWhenBuilt(L.Callback):
    """Send `signum` to this process when the CLI builds this callback: before Lightning runs anything."""

    def __init__(self, signum: int = int(signal.SIGINT)) -> None:
        os.kill(os.getpid(), signum)


class SignalAtSetup(L.Callback):
    """Send `signum` to this process in Lightning's setup: before the sanity check and gangen's handlers."""

    def __init__(self, signum: int = int(signal.SIGINT)) -> None:
        self.signum = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        os.kill(os.getpid(), self.signum)


class SignalInValidation(L.Callback):
    """At the first validation batch of fit (of its sanity check, with sanity), send `signum` to this process
    (to rank `rank`'s only, when given)."""

    def __init__(self, signum: int = int(signal.SIGTERM), sanity: bool = False, rank: int | None = None) -> None:
        self.signum, self.sanity, self.rank, self.sent = signum, sanity, rank, False

    def on_validation_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if (
            trainer.state.fn == "fit" and trainer.sanity_checking == self.sanity and not self.sent
            and self.rank in (None, trainer.global_rank)
        ):  # fmt: skip
            self.sent = True
            signal_self(self.signum)


class PoisonAt(L.Callback):
    """At the start of the first batch with global_step >= step, set the discriminator's weights to nan (on
    rank `rank` only, when given)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                for p in pl_module.discriminator.parameters():
                    p.fill_(float("nan"))


class KillAfterValidation(L.Callback):
    """SIGKILL this process at the end of fit's n-th validation: after GANMetrics wrote its metrics.jsonl row,
    before ModelCheckpoint (which Lightning runs last) saves."""

    def __init__(self, n: int = 1) -> None:
        self.n, self.seen = n, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGKILL)

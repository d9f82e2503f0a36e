"""Training side effects: sample grids from fixed latents, written to the run folder and the loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gangen.errors import ConfigError
from gangen.sampling import generate, grid_image, save_grid


def log_image(trainer: L.Trainer, key: str, image: torch.Tensor) -> None:
    """Send one (C, H, W) image in [-1, 1] to every logger that takes images, at the scalars' step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, (image + 1) / 2, global_step=trainer.global_step)
        elif hasattr(logger, "log_image"):  # WandbLogger and others with the same method
            logger.log_image(key=key, images=[((image + 1) / 2).clamp(0, 1)], step=trainer.global_step)


class SampleGrid(L.Callback):
    """Every `every_kimg` thousand images seen, a grid of the module's fixed latents (`grid_z`).

    Grids go to <run folder>/samples/kimg<NNNNNN>.png and to the loggers under "samples"; at the end of
    training a final grid is written as samples/final.png. Rank 0 only.
    """

    def __init__(self, every_kimg: float = 10.0, nrow: int = 8) -> None:
        if every_kimg <= 0:
            raise ConfigError(f"SampleGrid every_kimg {every_kimg!r} must be > 0")
        self.every_kimg = every_kimg
        self.nrow = nrow
        self._next_kimg: float | None = None

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        images = generate(pl_module.generator, len(pl_module.grid_z), z=pl_module.grid_z)  # (N, C, H, W)
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = save_grid(images, folder / f"{name}.png", nrow=self.nrow)
        log_image(trainer, "samples", grid_image(images, self.nrow))
        return path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        kimg = pl_module.images_seen / 1000
        self._next_kimg = (kimg // self.every_kimg + 1) * self.every_kimg
        if pl_module.images_seen == 0:
            self.write(trainer, pl_module, "kimg000000")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        kimg = pl_module.images_seen / 1000  # host-side counter: no device sync
        if self._next_kimg is not None and kimg >= self._next_kimg:
            self.write(trainer, pl_module, f"kimg{pl_module.images_seen // 1000:06d}")
            self._next_kimg = (kimg // self.every_kimg + 1) * self.every_kimg

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "final")

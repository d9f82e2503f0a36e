"""A test-only callback: each rank saves its final network parameters (and its data order's seed and
augmentation stream), so a test can compare ranks; with `record`, also what it trained on (a fingerprint of
every real image of every batch) and every latent batch it drew."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import lightning.pytorch as L
import torch


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """(B,) int64: a 56-bit hash of each image's values (equal images, equal fingerprints)."""
    rows = images.detach().float().cpu().numpy()
    return torch.tensor([int.from_bytes(hashlib.sha1(row.tobytes()).digest()[:7], "little") for row in rows])


class DumpParams(L.Callback):
    def __init__(self, folder: str, record: bool = False) -> None:
        self.folder, self.record = folder, record
        self.epochs: list[int] = []  # per training batch: its epoch
        self.images: list[torch.Tensor] = []  # per training batch: (B,) fingerprints of its real images
        self.latents: list[torch.Tensor] = []  # per draw of GAN.sample_latents: (n, latent_dim)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.record:
            return
        draw = pl_module.sample_latents

        def recorded(n: int) -> torch.Tensor:
            z = draw(n)
            self.latents.append(z.detach().cpu().clone())
            return z

        pl_module.sample_latents = recorded  # the training step looks it up on the instance

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        if self.record:
            self.epochs.append(trainer.current_epoch)
            self.images.append(fingerprints(batch[0]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        state["images_seen"] = torch.tensor(pl_module.images_seen)
        sampler = getattr(trainer.datamodule, "_train_sampler", None)
        if sampler is not None:  # the training order's seed: one for all ranks, or their shards overlap
            state["sampler_seed"] = torch.tensor(sampler.seed)
        if pl_module.augment._rng is not None:  # this rank's augmentation stream
            state["augment_rng_state"] = pl_module.augment._rng.get_state()
        torch.save(state, os.path.join(self.folder, f"params_rank{trainer.global_rank}.pt"))
        if self.record:
            trained = {"epochs": torch.tensor(self.epochs), "images": torch.stack(self.images),
                       "latents": torch.stack(self.latents)}  # fmt: skip
            torch.save(trained, os.path.join(self.folder, f"trained_rank{trainer.global_rank}.pt"))

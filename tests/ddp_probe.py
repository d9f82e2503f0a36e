"""A test-only callback: each rank saves its final network parameters (and its data order's seed and
augmentation stream), so a test can compare ranks."""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch


class DumpParams(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        state["images_seen"] = torch.tensor(pl_module.images_seen)
        sampler = getattr(trainer.datamodule, "_train_sampler", None)
        if sampler is not None:  # the training order's seed: one for all ranks, or their shards overlap
            state["sampler_seed"] = torch.tensor(sampler.seed)
        if pl_module.augment._rng is not None:  # this rank's augmentation stream
            state["augment_rng_state"] = pl_module.augment._rng.get_state()
        torch.save(state, os.path.join(self.folder, f"params_rank{trainer.global_rank}.pt"))

"""A test-only callback: each rank saves its final network parameters, so a test can compare ranks."""

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
        torch.save(state, os.path.join(self.folder, f"params_rank{trainer.global_rank}.pt"))

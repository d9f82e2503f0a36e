"""Sample grids and the metrics' schedule: when they happen, their names, and the pixels the loggers get."""

from __future__ import annotations

import io

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.callbacks import GANMetrics, SampleGrid


def test_grid_schedule_counts_whole_images_and_tensorboard_gets_the_png_pixels(tmp_path):
    """every_kimg 0.192 with batches of 64 is a grid every 3 batches. In float kimg the schedule drifted (a
    grid one batch late, then two in a row), names counted whole kimg only (grids under 1 kimg overwrote
    kimg000000.png), and TensorBoard got float pixels truncated on the way to 8 bits."""
    torch.manual_seed(0)
    model = GAN(
        DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8),
        DCGANDiscriminator(resolution=16, channels=1, base_channels=8),
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[SampleGrid(every_kimg=0.192)],
        logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=64, limit=1280))  # 20 batches
    samples = tmp_path / "tb" / "version_0" / "samples"
    periodic = [f"kimg{n // 1000:06d}_{n % 1000:03d}.png" for n in range(0, 1281, 192)]  # 0, 192, ..., 1152
    assert sorted(p.name for p in samples.iterdir()) == sorted([*periodic, "final.png"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    grids = events.Images("samples")
    assert [g.step for g in grids] == [0, 2, 5, 8, 11, 14, 17, 20]  # after batches 3, 6, ..., 18; the final
    for event, name in zip(grids, [*periodic, "final.png"], strict=True):
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("L"))
        np.testing.assert_array_equal(logged, np.asarray(Image.open(samples / name)))


def test_metrics_schedule_compares_whole_images():
    metrics = GANMetrics(feature_extractor="none", every_kimg=3.2)
    assert metrics.due(0)
    metrics._last_kimg = 6400 / 1000
    assert 9600 / 1000 - metrics._last_kimg < 3.2  # what skipped the evaluation at 9.6 kimg
    assert metrics.due(9600) and not metrics.due(9599)

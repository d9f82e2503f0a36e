"""The LightningModule, trained by a real Trainer on real Fashion-MNIST batches."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.errors import ConfigError


def small_gan(**kwargs) -> GAN:
    return GAN(
        generator=DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8),
        discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=8),
        **kwargs,
    )


def small_data(**kwargs) -> ImageDataModule:
    return ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256, **kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v)}


class PhaseRecorder(L.Callback):
    """Snapshots both networks before every optimizer step and at the end of every batch."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict, dict, dict]] = []

    def _record(self, tag, pl_module, grads=None):
        self.events.append((tag, snapshot(pl_module.generator), snapshot(pl_module.discriminator), grads or {}))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = "g" if optimizer.param_groups[0]["params"][0] is next(pl_module.generator.parameters()) else "d"
        grads = {
            "g": [p.grad is not None for p in pl_module.generator.parameters()],
            "d": [p.grad is not None for p in pl_module.discriminator.parameters()],
        }
        self._record(f"step_{net}", pl_module, grads)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._record("end", pl_module)


def _fit(model: GAN, batches: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=batches, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(model, small_data())
    return trainer


def test_d_phase_changes_only_d_and_g_phase_only_g():
    model = small_gan()
    recorder = PhaseRecorder()
    g0, d0 = snapshot(model.generator), snapshot(model.discriminator)
    _fit(model, batches=2, callbacks=[recorder])
    tags = [e[0] for e in recorder.events]
    assert tags == ["step_d", "step_g", "end", "step_d", "step_g", "end"]
    names_g, names_d = set(g0), set(d0)
    # from the start of batch 0 to its D step nothing moved; between D step and G step only D moved
    (_, g_sd, d_sd, grads_d), (_, g_sg, d_sg, grads_g), (_, g_end, d_end, _) = recorder.events[:3]
    assert all(torch.equal(g0[k], g_sd[k]) for k in names_g) and all(torch.equal(d0[k], d_sd[k]) for k in names_d)
    assert not any(grads_d["g"]) and all(grads_d["d"])  # D step: gradients on D only
    assert all(torch.equal(g_sd[k], g_sg[k]) for k in names_g)  # D phase left G alone
    assert sum(not torch.equal(d_sd[k], d_sg[k]) for k in names_d) == len(names_d)  # and moved every D param
    assert all(torch.equal(d_sg[k], d_end[k]) for k in names_d)  # G phase left D alone
    assert sum(not torch.equal(g_sg[k], g_end[k]) for k in names_g) == len(names_g)  # and moved every G param
    assert all(grads_g["g"])


def test_d_steps_per_g_step():
    model = small_gan(d_steps_per_g_step=3)
    recorder = PhaseRecorder()
    _fit(model, batches=6, callbacks=[recorder])
    steps = [e[0] for e in recorder.events if e[0] != "end"]
    assert steps == ["step_d", "step_d", "step_d", "step_g"] * 2
    assert model.images_seen == 6 * 32


def test_latents_are_per_rank_and_reproducible():
    a, b = small_gan(seed=3), small_gan(seed=3)
    assert torch.equal(a.sample_latents(4), b.sample_latents(4))
    assert not torch.equal(a.sample_latents(4), small_gan(seed=4).sample_latents(4))
    assert torch.equal(a.grid_z, b.grid_z) and a.grid_z.shape == (64, 16)


def test_losses_logged_finite():
    model = small_gan(loss="hinge")
    trainer = _fit(model, batches=4)
    metrics = trainer.logged_metrics
    for key in ("loss/d", "loss/g", "d/real", "d/fake", "progress/kimg"):
        assert key in metrics and torch.isfinite(torch.as_tensor(metrics[key])), key
    assert float(metrics["progress/kimg"]) == pytest.approx(4 * 32 / 1000)


def test_mismatched_networks():
    with pytest.raises(ConfigError, match="generator resolution=32 but discriminator resolution=16"):
        GAN(DCGANGenerator(resolution=32), DCGANDiscriminator(resolution=16))


def test_bad_d_steps():
    with pytest.raises(ConfigError, match="d_steps_per_g_step 0"):
        small_gan(d_steps_per_g_step=0)

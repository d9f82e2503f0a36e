"""--model.init_from: a new run (fine-tuning) that starts from another run's network weights."""

from __future__ import annotations

import re

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG, fails, run_cli, tiny_fit_args
from PIL import Image

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.errors import ConfigError
from gangen.sampling import export_safetensors


def test_cli_run_starts_from_the_weights_with_fresh_counters(trained_run, tmp_path):
    """The new run's first grid is the trained run's final grid (same fixed latents, same weights); its
    counters and optimizers start at zero; a resume of it takes the resumed checkpoint's weights."""
    trained = trained_run / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(tmp_path, "--model.init_from", str(trained), "--trainer.max_epochs", "1")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: generator, discriminator start from {trained} (init_from)" in r.stdout
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    first = np.asarray(Image.open(run / "samples" / "kimg000000.png"))
    np.testing.assert_array_equal(first, np.asarray(Image.open(trained_run / "samples" / "final.png")))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["images_seen"] == 640 and ckpt["epoch"] == 0  # this run's images only
    assert ckpt["hyper_parameters"]["init_from"] == str(trained)
    steps = [s["step"].item() for s in ckpt["optimizer_states"][0]["state"].values()]
    assert set(steps) == {10.0}  # Adam's moments from this run's 10 G steps, not the trained run's 20 more

    r = run_cli(
        *tiny_fit_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "init_from" not in r.stdout  # neither applied nor listed as a changed setting (unused on resume)
    resumed = torch.load(tmp_path / "dcgan_fashion_mnist/version_1/checkpoints/last.ckpt", weights_only=True)
    assert resumed["gangen"]["images_seen"] == 1280


def test_another_network_or_a_missing_file_is_one_line(capsys, trained_ckpt, tmp_path):
    from conftest import assert_fit_refused

    assert_fit_refused(capsys, tmp_path, ["--model.init_from", str(trained_ckpt), "--model.generator.base_channels",
                                          "16"], [f"init_from {trained_ckpt} was trained with generator",
                                                  "base_channels=32, the config has 16",
                                                  "--model.generator.base_channels 32"])  # fmt: skip
    line = fails(capsys, "fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--model.init_from", str(tmp_path / "no.ckpt"))  # fmt: skip
    assert "no.ckpt" in line and "not found" in line
    assert list(tmp_path.iterdir()) == []


def tiny(ema_kimg: float = 0.0, **kwargs) -> GAN:
    torch.manual_seed(1)
    return GAN(
        DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8),
        DCGANDiscriminator(resolution=16, channels=1, base_channels=8),
        ema_kimg=ema_kimg, **kwargs,
    )  # fmt: skip


def fit(model: GAN, root, steps: int = 4, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2 * steps, limit_val_batches=0, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256), ckpt_path=ckpt_path)
    return trainer


class Snapshot(L.Callback):
    """The networks' weights when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_python_init_from_a_checkpoint_an_ema_and_an_export(tmp_path):
    source = tiny()
    fit(source, tmp_path / "a")
    ckpt_path = tmp_path / "a" / "checkpoints" / next(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    saved = torch.load(ckpt_path, weights_only=True)["state_dict"]

    model, snap = tiny(ema_kimg=1.0, init_from=str(ckpt_path)), Snapshot()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[snap],
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256))
    for key, value in saved.items():
        if key.startswith(("generator.", "discriminator.")):
            assert torch.equal(snap.state[key], value), key
            if key.startswith("generator."):  # the source had no EMA: it starts as the generator
                assert torch.equal(snap.state["generator_ema." + key[len("generator.") :]], value)
    assert model.images_seen == 32 and model.batches_seen == 1  # counted from zero (max_steps 2: one batch)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[snap],
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256))
    assert all(torch.equal(snap.state[k], v) for k, v in trained.items())  # a second fit continues, not reset

    export, _ = export_safetensors(torch.load(ckpt_path, weights_only=True), tmp_path / "g.safetensors")
    fresh = tiny(init_from=str(export))
    d_before = {k: v.clone() for k, v in fresh.discriminator.state_dict().items()}
    states = fresh.read_init_from()
    assert sorted(states) == ["generator"]
    fresh._apply_init_from()
    assert all(torch.equal(fresh.generator.state_dict()[k[len("generator.") :]], v)
               for k, v in saved.items() if k.startswith("generator."))  # fmt: skip
    assert all(torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in d_before.items())

    other = GAN(
        DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=16),
        DCGANDiscriminator(resolution=16, channels=1, base_channels=8), init_from=str(ckpt_path),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"generator base_channels=8, the config has 16"):
        other.read_init_from()


def test_validate_without_a_checkpoint_validates_the_init_from_weights(trained_ckpt, tmp_path):
    """validate --model.init_from X validated freshly initialised weights without a word (val/loss_d ~2 ln 2)."""
    from conftest import DEMO_CONFIG

    common = ["validate", "--config", str(DEMO_CONFIG), "--trainer.logger", "false", "--trainer.limit_val_batches",
              "2", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    results, outputs = [], []
    for extra in (["--model.init_from", str(trained_ckpt)], ["--ckpt_path", str(trained_ckpt)]):
        r = run_cli(*common, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(float(re.search(r"val/loss_d\D+([0-9.]+)", r.stdout).group(1)))
        outputs.append(r.stdout)
    assert f"gangen: generator, discriminator start from {trained_ckpt} (init_from)" in outputs[0]  # said
    assert "start from" not in outputs[1]  # the checkpoint's own weights: nothing to say
    assert results[0] == pytest.approx(results[1], rel=1e-6)

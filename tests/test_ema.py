"""EMA maths, half-life conversion, buffers, and the EMA weights in checkpoints / generate."""

from __future__ import annotations

import json

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_fit_args
from PIL import Image
from torch import nn

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.classifier import save_classifier, train_classifier
from gangen.ema import ema_beta, make_ema, recalibrate_batchnorm_, update_ema_
from gangen.errors import ConfigError
from gangen.sampling import generate, grid_pixels, load_generator, read_checkpoint


def test_half_life_conversion():
    # after half_life_kimg * 1000 images, in any batch size, the old weight keeps half its influence
    for batch in (32, 64, 1000):
        beta = ema_beta(batch, half_life_kimg=10.0)
        assert beta ** (10_000 / batch) == pytest.approx(0.5, rel=1e-9)
    assert ema_beta(64, 10.0) == pytest.approx(0.5 ** (64 / 10_000))


def test_rampup_caps_the_half_life():
    # ramp-up 0.05 at 20k images: half-life min(10k, 1k) = 1k images
    assert ema_beta(100, 10.0, images_seen=20_000, rampup=0.05) == pytest.approx(0.5 ** (100 / 1000))
    assert ema_beta(100, 10.0, images_seen=10**7, rampup=0.05) == pytest.approx(0.5 ** (100 / 10_000))
    with pytest.raises(ConfigError, match="half_life_kimg"):
        ema_beta(64, 0.0)


def test_update_maths_and_buffers():
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = make_ema(live)
    assert not any(p.requires_grad for p in ema.parameters())
    old = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
        live[1].running_mean.fill_(7.0)
        live[1].num_batches_tracked.fill_(5)
    update_ema_(ema, live, beta=0.9)
    for e, o, p in zip(ema.parameters(), old, live.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)  # = o + 0.1
        torch.testing.assert_close(e, o + 0.1)
    assert torch.equal(ema[1].running_mean, torch.full((2,), 7.0))  # buffers copied, not averaged
    assert ema[1].num_batches_tracked.item() == 5


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, classifier_file):
    """Run folder of a 1-epoch CLI fit with an EMA generator and domain-FD metrics (16 samples)."""
    save_dir = tmp_path_factory.mktemp("ema_run")
    args = tiny_fit_args(
        save_dir, "--model.ema_kimg", "0.2", "--trainer.max_epochs", "1",
        "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "16",
        "--metrics.num_real", "16", "--metrics.cache_dir", str(save_dir / "cache"),
    )  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir / "dcgan_fashion_mnist" / "version_0"


def test_fit_saves_ema_and_generate_uses_it(ema_run, tmp_path):
    ckpt_path = ema_run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)  # weights_only=True
    state = ckpt["state_dict"]
    ema_keys = sorted(k for k in state if k.startswith("generator_ema."))
    assert ema_keys and len(ema_keys) == sum(k.startswith("generator.") for k in state)
    assert ckpt["hyper_parameters"]["ema_kimg"] == 0.2
    w = "net.0.weight"
    assert not torch.equal(state[f"generator_ema.{w}"], state[f"generator.{w}"])  # averaged, so different
    generator = load_generator(ckpt)
    assert torch.equal(generator.state_dict()[w], state[f"generator_ema.{w}"])
    # the saved EMA statistics are its own (re-estimated), not the live generator's copied ones
    stat = "net.1.running_mean"
    assert not torch.equal(state[f"generator_ema.{stat}"], state[f"generator.{stat}"])
    recalibrate_batchnorm_(generator, seed=ckpt["hyper_parameters"]["seed"])
    assert torch.equal(generator.state_dict()[stat], state[f"generator_ema.{stat}"])
    out = tmp_path / "grid.png"
    result = run_cli("generate", "--ckpt_path", str(ckpt_path), "--output", str(out), "--num_samples", "8")
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]


def test_grids_and_metrics_of_an_ema_run_come_from_the_ema_generator(ema_run, classifier_file, tmp_path):
    """README: sample grids and metrics use the EMA weights. samples/final.png is the grid of the fixed latents
    drawn by the checkpoint's EMA generator (with its saved, re-estimated statistics), not by the trained one;
    the last evaluation during fit equals `evaluate` of the checkpoint, which samples the EMA generator."""
    from gangen.cli import main

    ckpt_path = ema_run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    grid_z = ckpt["state_dict"]["grid_z"]  # (64, latent_dim): the fixed latents of every grid

    def grid(generator) -> np.ndarray:
        return grid_pixels(generate(generator, len(grid_z), z=grid_z))[..., 0]  # as SampleGrid draws it

    final = np.asarray(Image.open(ema_run / "samples" / "final.png"))
    np.testing.assert_array_equal(final, grid(load_generator(ckpt)))
    assert not np.array_equal(final, grid(load_generator(ckpt, ema=False)))  # so the check tells them apart

    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt_path", str(ckpt_path), "--feature_extractor", str(classifier_file),
          "--num_samples", "16", "--num_real", "16", "--cache_dir", str(ema_run.parent.parent / "cache"),
          "--output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    last = json.loads((ema_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["real_from_cache"] is True and last["kimg"] == 0.64  # the same real statistics and weights
    assert result["ema"] is True and last["ema"] is True  # both measured the EMA generator, and say so
    assert result["fd_fmnist"] == pytest.approx(last["fd_fmnist"], rel=1e-9)
    assert result["fd_fmnist_kid_mean"] == pytest.approx(last["fd_fmnist_kid_mean"], rel=1e-9)


class LiveRecorder(L.Callback):
    """The live generator's parameters after every batch (the EMA update follows the G step)."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.params.append([p.detach().clone() for p in pl_module.generator.parameters()])


def test_training_updates_ema_with_kimg_schedule():
    model = GAN(
        generator=DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8),
        discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=8, norm="spectral"),
        loss="hinge", ema_kimg=0.1, ema_rampup=0.5,
    )  # fmt: skip
    start = [p.detach().clone() for p in model.generator.parameters()]
    recorder = LiveRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=6, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256))
    expected = start
    for step, live in enumerate(recorder.params, start=1):  # 32 images a batch, half-life min(100, 0.5 * seen)
        beta = 0.5 ** (32 / min(100.0, 0.5 * 32 * step))
        expected = [beta * e + (1 - beta) * p for e, p in zip(expected, live, strict=True)]
    for got, want in zip(model.generator_ema.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    live_buffers = dict(model.generator.named_buffers())
    for name, buf in model.generator_ema.named_buffers():
        assert torch.equal(buf, live_buffers[name]), name  # batchnorm statistics copied


def test_early_stopping_on_domain_fd_with_ema(tmp_path):
    """EarlyStopping (and the EMA generator's metrics) on metric/fd_<classifier stem> is accepted in a real fit."""
    classifier, accuracy = train_classifier(
        ImageDataModule(limit=640, batch_size=64), epochs=1, enable_progress_bar=False, accelerator="cpu"
    )
    clf = save_classifier(classifier, tmp_path / "clf.pt", accuracy=accuracy)
    args = tiny_fit_args(
        tmp_path, "--trainer.max_epochs", "4", "--model.ema_kimg", "0.5", "--metrics.feature_extractor", str(clf),
        "--metrics.num_samples", "32", "--metrics.num_real", "64", "--metrics.cache_dir", str(tmp_path / "cache"),
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "metric/fd_clf",
        "--trainer.callbacks.patience", "0", "--trainer.callbacks.mode", "min", "--trainer.limit_train_batches", "3",
    )  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "dcgan_fashion_mnist/version_0/metrics.jsonl").open()]
    fds = [r["fd_clf"] for r in rows]
    # patience 0: training stops at the first FD that does not improve, or runs all 4 epochs while it improves
    stopped = next((i for i in range(1, len(fds)) if fds[i] >= fds[i - 1]), None)
    assert len(fds) == (stopped + 1 if stopped is not None else 4), fds


def test_recalibrate_batchnorm_is_the_average_over_its_own_outputs():
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=4).eval()
    first = g.net[1]  # the first BatchNorm2d
    assert isinstance(first, nn.BatchNorm2d)
    seen = []
    hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    rng_before = torch.get_rng_state()
    assert recalibrate_batchnorm_(g, batches=3, batch_size=5, seed=7)
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    assert not g.training and first.momentum == 0.1  # mode and momentum restored
    x = torch.cat(seen)  # (15, C, 4, 4): the three batches' inputs to the layer
    per_batch_mean = torch.stack([b.mean((0, 2, 3)) for b in seen])  # (3, C)
    per_batch_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in seen])
    torch.testing.assert_close(first.running_mean, per_batch_mean.mean(0))  # cumulative average over batches
    torch.testing.assert_close(first.running_var, per_batch_var.mean(0))
    assert first.num_batches_tracked.item() == 3 and x.shape[0] == 15
    before = {k: v.clone() for k, v in g.state_dict().items()}
    recalibrate_batchnorm_(g, batches=3, batch_size=5, seed=7)
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())  # same seed, same statistics
    assert not recalibrate_batchnorm_(DCGANGenerator(latent_dim=8, resolution=16, channels=1, norm="none"))


def test_eval_generator_reestimates_ema_statistics_once_per_batch():
    model = GAN(
        generator=DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=4),
        discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=4), ema_kimg=1.0,
    )  # fmt: skip
    live_stats = model.generator.net[1].running_var.clone()
    ema = model.eval_generator()
    assert ema is model.generator_ema
    assert not torch.equal(ema.net[1].running_var, live_stats)  # its own statistics now
    marker = ema.net[1].running_var.clone()
    ema.net[1].running_var.fill_(3.0)
    assert model.eval_generator().net[1].running_var.eq(3.0).all()  # same batch: not re-estimated again
    model.batches_seen += 1
    torch.testing.assert_close(model.eval_generator().net[1].running_var, marker)  # next batch: re-estimated
    plain = GAN(generator=DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=4),
                discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=4))  # fmt: skip
    assert plain.eval_generator() is plain.generator

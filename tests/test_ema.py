"""EMA maths, half-life conversion, buffers, and the EMA weights in checkpoints / generate."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, tiny_fit_args
from torch import nn

from gangen.ema import ema_beta, make_ema, update_ema_
from gangen.errors import ConfigError
from gangen.sampling import load_generator, read_checkpoint


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


def test_fit_saves_ema_and_generate_uses_it(tmp_path):
    result = run_cli(*tiny_fit_args(tmp_path, "--model.ema_kimg", "0.2", "--trainer.max_epochs", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)  # weights_only=True
    state = ckpt["state_dict"]
    ema_keys = sorted(k for k in state if k.startswith("generator_ema."))
    assert ema_keys and len(ema_keys) == sum(k.startswith("generator.") for k in state)
    assert ckpt["hyper_parameters"]["ema_kimg"] == 0.2
    w = "net.0.weight"
    assert not torch.equal(state[f"generator_ema.{w}"], state[f"generator.{w}"])  # averaged, so different
    generator = load_generator(ckpt)
    assert torch.equal(generator.state_dict()[w], state[f"generator_ema.{w}"])
    out = tmp_path / "grid.png"
    result = run_cli("generate", "--ckpt_path", str(ckpt_path), "--output", str(out), "--num_samples", "8")
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]

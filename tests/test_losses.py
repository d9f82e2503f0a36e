"""Loss objects on known logits."""

import csv
import math
import os

import pytest
import torch

from gangen.errors import ConfigError
from gangen.losses import gradient_penalty, make_loss, r1_penalty


def test_non_saturating_values():
    loss = make_loss("non_saturating")
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    d = loss.discriminator(real, fake)
    expected_real = (math.log(2) + math.log(1 + math.exp(-2))) / 2  # -log sigmoid(x)
    expected_fake = (math.log(2) + math.log(1 + math.exp(-1))) / 2  # -log(1 - sigmoid(x))
    assert d["real"].item() == pytest.approx(expected_real, rel=1e-6)
    assert d["fake"].item() == pytest.approx(expected_fake, rel=1e-6)
    assert d["loss"].item() == pytest.approx(expected_real + expected_fake, rel=1e-6)
    g = loss.generator(fake)
    assert g["loss"].item() == pytest.approx((math.log(2) + math.log(1 + math.exp(1))) / 2, rel=1e-6)


def test_non_saturating_is_stable_for_large_logits():
    loss = make_loss("non_saturating")
    d = loss.discriminator(torch.tensor([200.0]), torch.tensor([-200.0]))
    assert d["loss"].item() == pytest.approx(0.0, abs=1e-30)
    assert loss.generator(torch.tensor([-200.0]))["loss"].item() == pytest.approx(200.0)


def test_hinge_values():
    loss = make_loss("hinge")
    d = loss.discriminator(torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0]))
    assert d["real"].item() == pytest.approx(0.25)  # mean(relu(1 - [0.5, 2]))
    assert d["fake"].item() == pytest.approx(0.5)  # mean(relu(1 + [-2, 0]))
    assert loss.generator(torch.tensor([1.0, 3.0]))["loss"].item() == pytest.approx(-2.0)


def test_wasserstein_values():
    loss = make_loss("wasserstein")
    d = loss.discriminator(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0]))
    assert d["real"].item() == pytest.approx(-2.0)  # -mean D(x)
    assert d["fake"].item() == pytest.approx(-0.5)  # mean D(G(z))
    assert d["drift"].item() == pytest.approx(5.0)  # mean D(x)^2
    assert d["loss"].item() == pytest.approx(-2.5 + 1e-3 * 5.0)
    assert loss.generator(torch.tensor([1.0, 2.0]))["loss"].item() == pytest.approx(-1.5)


def test_least_squares_values():
    loss = make_loss("least_squares")
    d = loss.discriminator(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]))
    assert d["real"].item() == pytest.approx(0.5 * (0 + 4) / 2)  # 0.5 * mean (D(x) - 1)^2
    assert d["fake"].item() == pytest.approx(0.5 * (4 + 0) / 2)  # 0.5 * mean D(G(z))^2
    assert loss.generator(torch.tensor([3.0]))["loss"].item() == pytest.approx(2.0)


def test_gradient_penalty_on_known_gradient():
    # D(x) = sum(w * x): gradient w everywhere, so the penalty is weight * (||w|| - 1)^2 at any interpolate
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # ||w|| = 5
    real, fake = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    terms = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake, weight=10.0)
    assert terms["loss"].item() == pytest.approx(10.0 * 16.0)
    assert terms["grad_norm"].item() == pytest.approx(5.0)
    # D(x) = ||x||^2 / 2: gradient x_hat, so the penalty depends on the interpolation point and is trainable
    real = torch.full((3, 1, 2, 2), 2.0)
    terms = gradient_penalty(lambda x: 0.5 * x.square().flatten(1).sum(1), real, real.clone(), weight=1.0)
    assert terms["loss"].item() == pytest.approx((4.0 - 1.0) ** 2)  # ||x_hat|| = ||(2,2,2,2)|| = 4


def test_r1_on_known_discriminator():
    # D(x) = a * sum(x^2): grad 2 a x, ||grad||^2 = 4 a^2 ||x||^2; R1 = gamma / 2 * mean of that
    a = torch.tensor(0.5, requires_grad=True)
    real = torch.tensor([[1.0, 2.0], [0.0, 3.0]]).view(2, 1, 1, 2)  # ||x||^2 = 5 and 9
    terms = r1_penalty(lambda x: a * x.square().flatten(1).sum(1), real, gamma=2.0)
    expected = 2.0 / 2 * (4 * 0.25 * (5 + 9) / 2)  # = 7
    assert terms["loss"].item() == pytest.approx(expected)
    terms["loss"].backward()  # the penalty trains D: d/da of gamma/2 * 4 a^2 * 7 = gamma * 4 a * 7
    assert a.grad.item() == pytest.approx(2.0 * 4 * 0.5 * 7)
    assert real.grad is None  # the caller's images are not touched


@pytest.mark.parametrize("reg", ["r1", "gp"])
def test_penalties_under_fp16_take_input_gradients_through_the_loss_scale(reg):
    """Under 16-mixed the backward through D runs in float16: input gradients of 7e-7 per image (a no-norm D
    with a small last layer) underflow unscaled; through the loss scale they match float32."""
    from gangen.networks import DCGANDiscriminator

    torch.manual_seed(0)
    d = DCGANDiscriminator(resolution=16, channels=1, base_channels=8, norm="none")
    with torch.no_grad():
        d.net[-1].weight.mul_(1e-4)  # the logits conv
    real, fake = torch.rand(16, 1, 16, 16) * 2 - 1, torch.rand(16, 1, 16, 16) * 2 - 1

    def penalty(scaler=None):
        if reg == "r1":
            return r1_penalty(d, real, 1.0, scaler=scaler)
        return gradient_penalty(d, real, fake, 1.0, generator=torch.Generator().manual_seed(1), scaler=scaler)

    reference = penalty()["grad_norm"].item()
    assert 1e-7 < reference < 1e-5
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = penalty()["grad_norm"].item()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        terms = penalty(scaler)
        overflow = penalty(torch.amp.GradScaler("cpu", init_scale=2.0**24))
    assert abs(unscaled - reference) > 0.3 * reference  # the old way: mostly lost
    assert terms["grad_norm"].item() == pytest.approx(reference, rel=0.05)
    scaler.scale(terms["loss"]).backward()  # the penalty's own backward, scaled as in training
    assert d.net[0].weight.grad.isfinite().all()
    assert not math.isfinite(overflow["loss"].item())  # an overflow shows, so the scaler skips the step


def test_unknown_loss():
    with pytest.raises(ConfigError, match="unknown loss 'wgan'.*'hinge', 'wasserstein'"):
        make_loss("wgan")


@pytest.mark.parametrize(
    "reg,loss,precision",
    [
        ("r1", "non_saturating", "32-true"),
        ("gp", "wasserstein", "32-true"),
        ("gp", "wasserstein", "bf16-mixed"),
        ("r1", "non_saturating", "16-mixed"),
    ],
)
def test_lazy_regularisation_in_training(monkeypatch, tmp_path, reg, loss, precision):
    """A real fit: the penalty runs on D steps 0, 4 (reg_every=4 of 8), scaled by 4, and trains D. Under bf16
    autocast (the CLI's default on a bf16 CPU or GPU) G's images are bf16: the GP interpolation crashed.
    Under 16-mixed (fp16 autocast with a loss scaler; on the CPU through an explicit plugin, as Lightning
    turns the flag into bf16 there) the penalty gets the run's scaler; its first scale (2^16) overflows the
    first step, which the scaler skips and the divergence check (every batch here) does not take for one. The
    logged values are read from the metrics.csv that Lightning wrote (one row per batch)."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import MixedPrecision

    import gangen.system
    from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule

    calls, scalers = [], []
    real_fn = {"r1": gangen.system.r1_penalty, "gp": gangen.system.gradient_penalty}[reg]

    def counted(*args, **kwargs):
        out = real_fn(*args, **kwargs)
        calls.append(out["loss"].item())
        scalers.append(kwargs["scaler"])
        return out

    monkeypatch.setattr(gangen.system, {"r1": "r1_penalty", "gp": "gradient_penalty"}[reg], counted)
    model = GAN(
        generator=DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8),
        discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=8, norm="none"),
        loss=loss, reg=reg, reg_weight=5.0, reg_every=4, check_finite_every=1,
    )  # fmt: skip
    fp16 = precision == "16-mixed"
    fp16_plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=8, limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **({"plugins": [fp16_plugin]} if fp16 else {"precision": precision}),
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256))
    assert len(calls) == 2 and model.batches_seen == 8
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(8))
    penalty = (f"loss/d_{reg}", f"d/{reg}_grad_norm")
    # the rows of the batches where it is due (in between, Lightning repeats the last value logged)
    logged = {key: [float(rows[step][key]) for step in (0, 4)] for key in penalty}
    assert logged[penalty[0]] == pytest.approx([4 * c for c in calls], nan_ok=True)  # scaled by the interval
    assert all(math.isfinite(float(v)) for row in rows for k, v in row.items() if k not in penalty)
    for key in penalty:
        assert [math.isfinite(v) for v in logged[key]] == [not fp16, True]
    assert scalers == [trainer.precision_plugin.scaler if fp16 else None] * 2
    if fp16:
        assert trainer.precision_plugin.scaler.get_scale() < 2.0**16


def test_weight_decay_and_sgd_through_optimizer_configs():
    from conftest import DEMO_CONFIG

    from gangen.cli import GANCLI
    from gangen.data import ImageDataModule
    from gangen.system import GAN

    cli = GANCLI(GAN, ImageDataModule, run=False, auto_configure_optimizers=False, args=[
        "--config", str(DEMO_CONFIG), "--trainer.logger", "false",
        "--model.d_optimizer", "torch.optim.SGD", "--model.d_optimizer.lr", "0.01",
        "--model.d_optimizer.momentum", "0.9", "--model.d_optimizer.weight_decay", "1e-5",
        "--model.g_optimizer", "torch.optim.AdamW", "--model.g_optimizer.weight_decay", "0.01",
    ])  # fmt: skip
    opt_g, opt_d = cli.model.configure_optimizers()
    assert isinstance(opt_d, torch.optim.SGD) and opt_d.defaults["momentum"] == 0.9
    assert opt_d.defaults["weight_decay"] == 1e-5
    assert isinstance(opt_g, torch.optim.AdamW) and opt_g.defaults["weight_decay"] == 0.01


def test_bad_regulariser_settings():
    from gangen import GAN, DCGANDiscriminator, DCGANGenerator

    nets = dict(generator=DCGANGenerator(resolution=16), discriminator=DCGANDiscriminator(resolution=16))
    with pytest.raises(ConfigError, match="unknown reg 'l2'"):
        GAN(**nets, reg="l2")
    with pytest.raises(ConfigError, match="reg_every 0"):
        GAN(**nets, reg="r1", reg_every=0)
    with pytest.raises(ConfigError, match="ema_kimg -1"):
        GAN(**nets, ema_kimg=-1)

"""Loss objects on known logits."""

import math

import pytest
import torch

from gangen.errors import ConfigError
from gangen.losses import make_loss


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


def test_unknown_loss():
    with pytest.raises(ConfigError, match="unknown loss 'wgan'.*'non_saturating', 'hinge'"):
        make_loss("wgan")

"""Loss objects on known logits."""

import math

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


def test_unknown_loss():
    with pytest.raises(ConfigError, match="unknown loss 'wgan'.*'non_saturating', 'hinge'"):
        make_loss("wgan")

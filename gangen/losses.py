"""GAN losses and discriminator regularisers. Loss objects own the maths; the training loop only calls them.

`discriminator(real_logits, fake_logits)` and `generator(fake_logits)` return a dict of named scalar terms
whose "loss" entry is what gets back-propagated. Penalties that need the discriminator itself (the WGAN-GP
gradient penalty, R1) are functions of (discriminator, images) returning the same kind of dict; the loop
calls them every `reg_every` discriminator steps and scales them by that interval ("lazy" regularisation,
Karras et al. 2020), so their average strength does not depend on the interval.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gangen.errors import ConfigError
from gangen.layers import check_choice

Critic = Callable[[torch.Tensor], torch.Tensor]  # images (B, C, H, W) -> logits (B,)


class GANLoss:
    """Base class: subclasses implement the two phases."""

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generator(self, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class NonSaturatingLoss(GANLoss):
    """DCGAN's loss: binary cross-entropy on logits; G maximises log D(G(z)) (Goodfellow et al. 2014)."""

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        real = F.softplus(-real_logits).mean()  # -log sigmoid(D(x))
        fake = F.softplus(fake_logits).mean()  # -log(1 - sigmoid(D(G(z))))
        return {"loss": real + fake, "real": real, "fake": fake}

    def generator(self, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.softplus(-fake_logits).mean()}  # -log sigmoid(D(G(z)))


class HingeLoss(GANLoss):
    """Hinge loss (Lim & Ye 2017; SNGAN, BigGAN)."""

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        real = F.relu(1.0 - real_logits).mean()
        fake = F.relu(1.0 + fake_logits).mean()
        return {"loss": real + fake, "real": real, "fake": fake}

    def generator(self, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": -fake_logits.mean()}


class WassersteinLoss(GANLoss):
    """Wasserstein critic loss (Arjovsky et al. 2017); pair it with `gradient_penalty` (WGAN-GP).

    A small drift term eps * E[D(x)^2] (Karras et al. 2018) keeps the critic's outputs near 0.
    """

    def __init__(self, drift: float = 1e-3) -> None:
        self.drift = drift  # weight of E[D(x)^2]

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        real, fake = -real_logits.mean(), fake_logits.mean()
        drift = real_logits.square().mean()
        return {"loss": real + fake + self.drift * drift, "real": real, "fake": fake, "drift": drift}

    def generator(self, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": -fake_logits.mean()}


class LeastSquaresLoss(GANLoss):
    """Least-squares GAN (Mao et al. 2017), targets a=0 (fake), b=1 (real), c=1 (what G wants)."""

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        real = 0.5 * (real_logits - 1.0).square().mean()
        fake = 0.5 * fake_logits.square().mean()
        return {"loss": real + fake, "real": real, "fake": fake}

    def generator(self, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": 0.5 * (fake_logits - 1.0).square().mean()}


LOSSES: dict[str, type[GANLoss]] = {
    "non_saturating": NonSaturatingLoss,
    "hinge": HingeLoss,
    "wasserstein": WassersteinLoss,
    "least_squares": LeastSquaresLoss,
}
REGULARIZERS = ("none", "r1", "gp")


def loss_name(loss: str | GANLoss) -> str:
    """The name of a loss given by name or as one of LOSSES' objects (e.g. HingeLoss())."""
    if isinstance(loss, GANLoss):
        names = [name for name, cls in LOSSES.items() if type(loss) is cls]
        if not names:
            raise ConfigError(f"loss {type(loss).__name__}: GAN takes the losses {', '.join(map(repr, LOSSES))}")
        return names[0]
    return loss


def make_loss(name: str) -> GANLoss:
    """Loss object by name; unknown names raise a one-line ConfigError listing the choices."""
    return LOSSES[check_choice("loss", name, tuple(LOSSES))]()


def _input_gradients(
    critic: Critic, images: torch.Tensor, scaler: torch.amp.GradScaler | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B,), d sum(logits) / d images (B, C, H, W)), with a graph so the penalty can be trained.

    `scaler`: the fp16 loss scaler of a 16-mixed run. The backward through D then runs in float16, where
    input gradients below about 1e-5 per image underflow. They are taken of the scaled mean logit, as torch's
    AMP recipe for gradient penalties does with a loss (so they overflow about when the loss's own backward
    would), and multiplied back by batch / scale on the device (no host sync). After an overflow the penalty
    is inf and the scaler skips the step, as for any other overflow.
    """
    images = images.detach().requires_grad_(True)
    logits = critic(images)
    if scaler is None or not scaler.is_enabled():
        (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
        return logits, grad
    (scaled,) = torch.autograd.grad(scaler.scale(logits.mean()), images, create_graph=True)
    scale = scaler.scale(torch.ones((), device=images.device))  # the current scale, as a device tensor
    return logits, scaled * (logits.shape[0] / scale)


def r1_penalty(
    critic: Critic, real: torch.Tensor, gamma: float, scaler: torch.amp.GradScaler | None = None
) -> dict[str, torch.Tensor]:
    """R1 (Mescheder et al. 2018): gamma/2 * E ||grad_x D(x)||^2 on real images (scaler: see _input_gradients)."""
    _, grad = _input_gradients(critic, real, scaler)
    norm2 = grad.square().flatten(1).sum(1)  # (B,)
    return {"loss": 0.5 * gamma * norm2.mean(), "grad_norm": norm2.detach().sqrt().mean()}


def gradient_penalty(
    critic: Critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    weight: float,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """WGAN-GP (Gulrajani et al. 2017): weight * E (||grad D(x_hat)|| - 1)^2 at x_hat = real + u (fake - real)."""
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)  # (B, 1, 1, 1)
    mixed = torch.lerp(real.detach(), fake.detach().to(real.dtype), u)  # bf16 autocast: G's images are bf16
    _, grad = _input_gradients(critic, mixed, scaler)
    norm = grad.flatten(1).norm(dim=1)  # (B,)
    return {"loss": weight * (norm - 1.0).square().mean(), "grad_norm": norm.detach().mean()}

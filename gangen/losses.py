"""GAN losses. Each loss object owns the maths; the training loop only calls it.

`discriminator(real_logits, fake_logits)` and `generator(fake_logits)` return a dict of named scalar terms
whose "loss" entry is what gets back-propagated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gangen.layers import check_choice


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


LOSSES: dict[str, type[GANLoss]] = {"non_saturating": NonSaturatingLoss, "hinge": HingeLoss}


def make_loss(name: str) -> GANLoss:
    """Loss object by name; unknown names raise a one-line ConfigError listing the choices."""
    return LOSSES[check_choice("loss", name, tuple(LOSSES))]()

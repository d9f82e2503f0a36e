"""gangen: DCGAN-style GAN training on PyTorch Lightning."""

from gangen.data import ImageDataModule
from gangen.losses import HingeLoss, NonSaturatingLoss, make_loss
from gangen.networks import DCGANDiscriminator, DCGANGenerator, build_network, network_spec
from gangen.sampling import generate, load_generator
from gangen.system import GAN

__all__ = [
    "GAN",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "HingeLoss",
    "ImageDataModule",
    "NonSaturatingLoss",
    "build_network",
    "generate",
    "load_generator",
    "make_loss",
    "network_spec",
]
__version__ = "0.1.0"

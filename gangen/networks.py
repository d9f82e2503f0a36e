"""DCGAN generator and discriminator: plain nn.Modules, no Lightning inside.

Both keep their constructor arguments in `self.config`, so a checkpoint can store a network as plain
values ({"class_path": ..., "init_args": ...}, see `network_spec`) and rebuild it with `build_network`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import nn

from gangen.errors import ConfigError
from gangen.layers import (
    D_NORMS,
    G_NORMS,
    UPSAMPLE_MODES,
    apply_spectral_norm_,
    check_channels,
    check_choice,
    check_resolution,
    init_weights,
    norm_2d,
    upsample_layer,
)


class DCGANGenerator(nn.Module):
    """latent (B, latent_dim) -> image (B, channels, resolution, resolution) in [-1, 1].

    A transposed conv maps the latent to 4x4; each following block doubles the size and halves the width
    (up-convolution + norm + ReLU); the last block maps to `channels` with tanh.
    """

    def __init__(
        self,
        latent_dim: int = 100,  # size of z
        resolution: int = 64,  # output size: 16, 32, 64, 128 or 256
        channels: int = 3,  # 1 greyscale, 3 RGB
        base_channels: int = 64,  # width of the last hidden block; doubles towards 4x4
        max_channels: int = 512,  # cap on any block's width
        upsample: str = "transposed",  # "transposed" | "bilinear_transposed" | "resize_conv"
        norm: str = "batch",  # "batch" | "none"
        init: str = "dcgan",  # "dcgan": N(0, 0.02) convs, N(1, 0.02) batchnorm; "pytorch": defaults
    ) -> None:
        super().__init__()
        n_up = check_resolution(resolution) - 2  # number of 2x blocks after the 4x4 stem
        check_channels(channels)
        check_choice("upsample", upsample, UPSAMPLE_MODES)
        check_choice("norm", norm, G_NORMS)
        check_choice("init", init, ("dcgan", "pytorch"))
        if latent_dim < 1 or base_channels < 1 or max_channels < 1:
            raise ConfigError(
                f"latent_dim, base_channels, max_channels must be >= 1, got {latent_dim}, {base_channels}, "
                f"{max_channels}"
            )
        self.config: dict[str, Any] = dict(
            latent_dim=latent_dim, resolution=resolution, channels=channels, base_channels=base_channels,
            max_channels=max_channels, upsample=upsample, norm=norm, init=init,
        )  # fmt: skip
        self.latent_dim = latent_dim
        widths = [min(max_channels, base_channels * 2 ** (n_up - 1 - i)) for i in range(n_up)]
        bias = norm == "none"  # a bias before batchnorm is redundant
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], kernel_size=4, stride=1, padding=0, bias=bias),
            norm_2d(norm, widths[0]),
            nn.ReLU(inplace=True),
        ]  # (B, latent, 1, 1) -> (B, widths[0], 4, 4)
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [upsample_layer(c_in, c_out, upsample, bias), norm_2d(norm, c_out), nn.ReLU(inplace=True)]
        layers += [upsample_layer(widths[-1], channels, upsample, bias=True), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))  # (B, C, H, W)


class DCGANDiscriminator(nn.Module):
    """image (B, channels, resolution, resolution) -> logits (B,) (no sigmoid).

    Stride-2 conv + LeakyReLU(0.2) blocks halve the size and double the width (capped) down to 4x4,
    then a 4x4 conv gives one logit. No norm on the first block, as in DCGAN.
    """

    def __init__(
        self,
        resolution: int = 64,  # input size: 16, 32, 64, 128 or 256
        channels: int = 3,  # 1 greyscale, 3 RGB
        base_channels: int = 64,  # width of the first block; doubles at every halving
        max_channels: int = 512,  # cap on any block's width
        norm: str = "batch",  # "batch" | "spectral" | "none"
        init: str = "dcgan",  # "dcgan": N(0, 0.02) convs, N(1, 0.02) batchnorm; "pytorch": defaults
    ) -> None:
        super().__init__()
        n_down = check_resolution(resolution) - 2  # number of 2x halvings down to 4x4
        check_channels(channels)
        check_choice("norm", norm, D_NORMS)
        check_choice("init", init, ("dcgan", "pytorch"))
        if base_channels < 1 or max_channels < 1:
            raise ConfigError(f"base_channels, max_channels must be >= 1, got {base_channels}, {max_channels}")
        self.config: dict[str, Any] = dict(
            resolution=resolution, channels=channels, base_channels=base_channels, max_channels=max_channels,
            norm=norm, init=init,
        )  # fmt: skip
        widths = [min(max_channels, base_channels * 2**i) for i in range(n_down)]
        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]  # (B, C, R, R) -> (B, widths[0], R/2, R/2)
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=norm != "batch"),
                norm_2d(norm, c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=0)]  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        init_weights(self, init)
        if norm == "spectral":
            apply_spectral_norm_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # (B,)


def network_spec(module: nn.Module) -> dict[str, Any]:
    """Plain-value description of a network: {"class_path": "pkg.mod.Class", "init_args": {...}}."""
    config = getattr(module, "config", None)
    if not isinstance(config, dict):
        raise ConfigError(
            f"{type(module).__name__} has no `config` dict of its constructor arguments: add one so that "
            "checkpoints can rebuild the network"
        )
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(config)}


def build_network(spec: dict[str, Any] | nn.Module) -> nn.Module:
    """Inverse of `network_spec`; an nn.Module passes through unchanged.

    Only gangen's modules are imported on demand; a class from elsewhere must already be imported, so a
    checkpoint cannot make us import arbitrary code.
    """
    if isinstance(spec, nn.Module):
        return spec
    class_path = spec.get("class_path", "") if isinstance(spec, dict) else ""
    module_name, _, class_name = class_path.rpartition(".")
    cls = None
    if module_name == "gangen" or module_name.startswith("gangen."):
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass  # reported below
    if module_name in sys.modules:
        cls = getattr(sys.modules[module_name], class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"network class_path {class_path!r} is not a torch.nn.Module subclass of an imported module: "
            "import the module that defines it before loading"
        )
    return cls(**spec.get("init_args", {}))

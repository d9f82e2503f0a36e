"""DCGAN generator and discriminator: plain nn.Modules, no Lightning inside.

Both keep their constructor arguments in `self.config`, so a checkpoint can store a network as plain
values ({"class_path": ..., "init_args": ...}, see `network_spec`) and rebuild it with `build_network`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gangen.cache_dir import human, usable_memory
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

    Class-conditional with num_classes > 0: a learned label embedding (latent_dim values) is concatenated
    to z, and forward takes labels (B,); without labels it uses 0, 1, ..., num_classes - 1, 0, 1, ... so that
    metrics and grids get every class equally often.
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
        num_classes: int = 0,  # > 0: class-conditional (label embedding concatenated to z)
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
        check_num_classes(num_classes)
        self.config: dict[str, Any] = dict(
            latent_dim=latent_dim, resolution=resolution, channels=channels, base_channels=base_channels,
            max_channels=max_channels, upsample=upsample, norm=norm, init=init,
        )  # fmt: skip
        if num_classes:
            self.config["num_classes"] = num_classes  # only when set: unconditional specs stay as they were
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        widths = [min(max_channels, base_channels * 2 ** (n_up - 1 - i)) for i in range(n_up)]
        z_in = latent_dim * (2 if num_classes else 1)
        check_weight_memory(self, z_in * widths[0] + _pairs(widths) + widths[-1] * channels, num_classes * latent_dim)
        bias = norm == "none"  # a bias before batchnorm is redundant
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim * (2 if num_classes else 1), widths[0], 4, stride=1, padding=0, bias=bias),
            norm_2d(norm, widths[0]),
            nn.ReLU(inplace=True),
        ]  # (B, latent, 1, 1) -> (B, widths[0], 4, 4)
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [upsample_layer(c_in, c_out, upsample, bias), norm_2d(norm, c_out), nn.ReLU(inplace=True)]
        layers += [upsample_layer(widths[-1], channels, upsample, bias=True), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self, init)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight)  # N(0, 1), the scale of z

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                labels = torch.arange(z.shape[0], device=z.device) % self.num_classes  # (B,) balanced classes
            z = torch.cat([z, self.embed(labels)], dim=1)  # (B, 2 * latent_dim)
        return self.net(z.view(z.shape[0], -1, 1, 1))  # (B, C, H, W)


class DCGANDiscriminator(nn.Module):
    """image (B, channels, resolution, resolution) -> logits (B,) (no sigmoid).

    Stride-2 conv + LeakyReLU(0.2) blocks halve the size and double the width (capped) down to 4x4,
    then a 4x4 conv gives one logit. No norm on the first block, as in DCGAN. `dropout` > 0 adds dropout
    after every hidden block. With num_classes > 0 it is a projection discriminator (Miyato & Koyama 2018):
    logit = conv(h) + <embed(y), sum_hw h> for the last 4x4 features h, and forward needs labels (B,).
    """

    def __init__(
        self,
        resolution: int = 64,  # input size: 16, 32, 64, 128 or 256
        channels: int = 3,  # 1 greyscale, 3 RGB
        base_channels: int = 64,  # width of the first block; doubles at every halving
        max_channels: int = 512,  # cap on any block's width
        norm: str = "batch",  # "batch" | "spectral" | "none"
        init: str = "dcgan",  # "dcgan": N(0, 0.02) convs, N(1, 0.02) batchnorm; "pytorch": defaults
        dropout: float = 0.0,  # dropout probability after each hidden block; 0: none
        num_classes: int = 0,  # > 0: projection discriminator conditioned on class labels
    ) -> None:
        super().__init__()
        n_down = check_resolution(resolution) - 2  # number of 2x halvings down to 4x4
        check_channels(channels)
        check_choice("norm", norm, D_NORMS)
        check_choice("init", init, ("dcgan", "pytorch"))
        if base_channels < 1 or max_channels < 1:
            raise ConfigError(f"base_channels, max_channels must be >= 1, got {base_channels}, {max_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"discriminator dropout {dropout!r} must be in [0, 1)")
        check_num_classes(num_classes)
        self.config: dict[str, Any] = dict(
            resolution=resolution, channels=channels, base_channels=base_channels, max_channels=max_channels,
            norm=norm, init=init,
        )  # fmt: skip
        self.config |= {k: v for k, v in (("dropout", dropout), ("num_classes", num_classes)) if v}  # only when set
        self.num_classes = num_classes
        widths = [min(max_channels, base_channels * 2**i) for i in range(n_down)]
        check_weight_memory(self, channels * widths[0] + _pairs(widths) + widths[-1], num_classes * widths[-1])

        def drop() -> list[nn.Module]:
            return [nn.Dropout(dropout)] if dropout else []

        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            *drop(),
        ]  # (B, C, R, R) -> (B, widths[0], R/2, R/2)
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=norm != "batch"),
                norm_2d(norm, c_out),
                nn.LeakyReLU(0.2, inplace=True),
                *drop(),
            ]
        layers += [nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=0)]  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, widths[-1]) if num_classes else None  # projection vectors
        init_weights(self, init)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if norm == "spectral":
            apply_spectral_norm_(self)
            if self.embed is not None:
                self.embed = spectral_norm(self.embed)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.net(x).flatten()  # (B,)
        if labels is None:
            raise ValueError("a conditional discriminator needs labels (B,)")  # a caller bug, not user input
        h = self.net[:-1](x)  # (B, C_last, 4, 4)
        projection = (self.embed(labels) * h.sum(dim=(2, 3))).sum(dim=1)  # (B,)
        return self.net[-1](h).flatten() + projection  # (B,)


def _pairs(widths: list[int]) -> int:
    """Sum of c_in * c_out over consecutive widths: the hidden convolutions' channel pairs."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def check_weight_memory(network: nn.Module, channel_pairs: int, embedding: int) -> None:
    """ConfigError before any allocation when the network's float32 weights alone (4x4 kernels: 16 per channel
    pair, plus the class embedding) would not fit in the memory this process may use (`usable_memory`): the
    widths (latent_dim, base_channels, max_channels) are too large, and torch's allocator would fail with a
    traceback, or the system would kill the process while initialising the weights."""
    weights = 16 * channel_pairs + embedding
    usable = usable_memory()  # None (not POSIX): torch's own error remains
    if usable is not None and weights * 4 > usable[0]:
        names = [k for k in ("latent_dim", "base_channels", "max_channels") if k in network.config]
        config = ", ".join(f"{k}={network.config[k]}" for k in names)
        raise ConfigError(
            f"{type(network).__name__}({config}) has about {weights / 1e9:,.1f} billion weights, "
            f"{human(weights * 4)} as float32, more than {usable[1]}: "
            f"lower {', '.join(names[:-1])} or {names[-1]}"
        )


def check_num_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes {num_classes!r} must be 0 (unconditional) or the number of classes")
    return num_classes


def network_spec(module: nn.Module) -> dict[str, Any]:
    """Plain-value description of a network: {"class_path": "pkg.mod.Class", "init_args": {...}}."""
    config = getattr(module, "config", None)
    if not isinstance(config, dict):
        raise ConfigError(
            f"{type(module).__name__} has no `config` dict of its constructor arguments: add one so that "
            "checkpoints can rebuild the network"
        )
    cls = type(module)
    for key, value in config.items():
        if not _plain(value):
            raise ConfigError(
                f"{cls.__name__}.config[{key!r}] is a {type(value).__name__}: a checkpoint holds plain values only "
                "(numbers, strings, lists, dicts); store a name (e.g. 'relu') and build the object in __init__"
            )
    try:
        inspect.signature(cls).bind_partial(**config)
    except TypeError as err:
        raise ConfigError(
            f"{cls.__name__}.config does not fit {cls.__name__}.__init__ ({err}): the config must hold the constructor "
            "arguments, so that a checkpoint can rebuild the network"
        ) from None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(config)}


def _plain(value: Any) -> bool:
    """A value a weights_only checkpoint (and a YAML config) holds as it is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def build_network(spec: dict[str, Any] | nn.Module) -> nn.Module:
    """Inverse of `network_spec`; an nn.Module passes through unchanged.

    Only gangen's modules are imported on demand; a class from elsewhere must already be imported, so a
    checkpoint cannot make us import arbitrary code.
    """
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, type):
        raise ConfigError(f"the network {spec.__name__} is a class: pass an instance, e.g. {spec.__name__}(...)")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"a network must be an nn.Module instance (e.g. DCGANGenerator(...)) or a class_path/init_args dict, "
            f"got {spec!r}"
        )
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
            "import the module that defines it before loading (gangen's commands load gangen's own networks only: "
            "from Python, import it, then gangen.load_generator)"
        )
    return cls(**spec.get("init_args", {}))


def check_same_network(source: str, name: str, saved: dict[str, Any], module: nn.Module, fix: str) -> None:
    """ConfigError unless `module` is the network `saved` describes (its weights load as they are): class and
    every constructor argument, those left out of a spec (num_classes 0, dropout 0) at their defaults.
    `source` names the file ("checkpoint X", "init_from X"); `fix` ends the message."""
    try:
        current = network_spec(module)
    except ConfigError:  # a network without a config: load_state_dict's own check is all there is
        return
    if saved.get("class_path") and saved["class_path"] != current["class_path"]:
        raise ConfigError(
            f"{source} was trained with {name} {saved['class_path']}, the config has {current['class_path']}: "
            f"{fix} (--model.{name} {saved['class_path']})"
        )
    defaults = {k: p.default for k, p in inspect.signature(type(module)).parameters.items() if p.default is not p.empty}
    was, now = {**defaults, **(saved.get("init_args") or {})}, {**defaults, **current["init_args"]}
    for key in sorted(was.keys() | now.keys()):
        if was.get(key) != now.get(key):
            raise ConfigError(
                f"{source} was trained with {name} {key}={was.get(key)!r}, the config has {now.get(key)!r}: "
                f"{fix} (--model.{name}.{key} {was.get(key)})"
            )

"""Building blocks shared by the networks: upsampling layers, norm factory, weight initialisation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gangen.errors import ConfigError

UPSAMPLE_MODES = ("transposed", "bilinear_transposed", "resize_conv")
G_NORMS = ("batch", "none")
D_NORMS = ("batch", "spectral", "none")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise a one-line ConfigError naming both."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(repr(c) for c in choices)}")
    return value


def check_resolution(resolution: int, low: int = 16, high: int = 256) -> int:
    """Resolutions are powers of two in [low, high]; returns log2(resolution)."""
    if not isinstance(resolution, int) or resolution < low or resolution > high or resolution & (resolution - 1):
        powers = ", ".join(str(2**k) for k in range(low.bit_length() - 1, high.bit_length()))
        raise ConfigError(f"resolution {resolution!r} is not supported: use a power of two in {powers}")
    return resolution.bit_length() - 1


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"channels {channels!r} is not supported: use 1 (greyscale) or 3 (RGB)")
    return channels


def upsample_layer(in_ch: int, out_ch: int, mode: str, bias: bool = False) -> nn.Module:
    """A layer that doubles H and W: (B, in_ch, H, W) -> (B, out_ch, 2H, 2W)."""
    if mode in ("transposed", "bilinear_transposed"):
        conv = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=bias)
        conv.bilinear_init = mode == "bilinear_transposed"  # read by init_weights
        return conv
    # Resize-convolution (Odena et al. 2016): nearest-neighbour upsampling then a 3x3 conv, so every
    # output pixel sees the same number of kernel taps and no checkerboard pattern can appear.
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=bias),
    )


def nhwc_strides(x: torch.Tensor) -> torch.Tensor:
    """A 1-channel (B, 1, H, W) tensor as a view with NHWC strides (H*W, 1, W, 1); anything else unchanged.

    With one channel both layouts are contiguous, so `.contiguous(memory_format=torch.channels_last)` keeps
    NCHW strides and the tensor reads as NCHW (`suggest_memory_format`). cuDNN's conv backward converts the
    output gradient to the input's layout: for D's first conv on such an image that is a (B, 64, H/2, W/2)
    copy to NCHW, and for the input gradient one back to NHWC (4 per DCGAN step: the copies in README Speed).
    """
    if x.dim() != 4 or x.shape[1] != 1:
        return x
    n, _, h, w = x.shape
    return x.reshape(n, h, w, 1).permute(0, 3, 1, 2)  # (n, 1, h, w), strides (h*w, 1, w, 1)


def norm_2d(kind: str, channels: int) -> nn.Module:
    """Feature-map normalisation after a conv; spectral norm wraps the conv instead (see `maybe_spectral`)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def apply_spectral_norm_(module: nn.Module) -> None:
    """Wrap every conv of `module` in spectral normalisation (call after init_weights)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            setattr(module, name, spectral_norm(child))
        else:
            apply_spectral_norm_(child)


def bilinear_kernel(size: int) -> torch.Tensor:
    """(size, size) kernel that, in a stride size//2 transposed conv, performs bilinear upsampling."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    pos = torch.arange(size, dtype=torch.float64)
    taps = 1 - (pos - center).abs() / factor  # e.g. size 4: [0.25, 0.75, 0.75, 0.25]
    return torch.outer(taps, taps).float()


@torch.no_grad()
def init_bilinear_(conv: nn.ConvTranspose2d) -> None:
    """Initialise a transposed conv as bilinear upsampling of channel-group means.

    Output channel j is the bilinear upsampling of the mean of input channels {i : i % out == j}
    (the identity map when in == out), so training starts from smooth upsampling. It equals
    F.interpolate(mode="bilinear", align_corners=False) except on the outermost ring of pixels, where the
    missing neighbour is the conv's zero padding (a constant map gives 3/4 on edges, 9/16 in corners).
    Weight layout: (in_ch, out_ch, k, k).
    """
    in_ch, out_ch, k, _ = conv.weight.shape
    kernel = bilinear_kernel(k)
    conv.weight.zero_()
    groups = torch.bincount(torch.arange(in_ch) % out_ch, minlength=out_ch)  # inputs per output channel
    for i in range(in_ch):
        j = i % out_ch
        conv.weight[i, j] = kernel / groups[j]
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str = "dcgan") -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), batchnorm weights N(1, 0.02), biases 0.

    Transposed convs flagged `bilinear_init` get the bilinear kernel instead. scheme="pytorch" keeps
    PyTorch's defaults (bilinear kernels are still applied).
    """
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d) and getattr(m, "bilinear_init", False):
            init_bilinear_(m)
        elif scheme == "dcgan" and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif scheme == "dcgan" and isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

"""Exponential moving average of the generator's weights, scheduled in images seen (Karras et al. 2019/2020).

beta = 0.5 ** (batch_images / (half_life_kimg * 1000)): after half_life_kimg thousand images a weight's
old value has half its influence, whatever the batch size. With a ramp-up r the half-life is capped at
r * images_seen, so the average forgets the random initial weights quickly early in training.

Parameters are averaged; buffers (batchnorm running statistics, spectral-norm vectors) are copied from the
live generator, as StyleGAN2-ADA does: running statistics of averaged weights would need a recomputation
pass, and copying keeps them from the same, nearby network. Generation runs in eval mode, so these copied
running statistics are what the EMA generator uses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gangen.errors import ConfigError


def ema_beta(batch_images: int, half_life_kimg: float, images_seen: int = 0, rampup: float | None = None) -> float:
    """Decay of one EMA update after a batch of `batch_images` (summed over ranks)."""
    if half_life_kimg <= 0:
        raise ConfigError(f"ema half_life_kimg {half_life_kimg!r} must be > 0 (or switch the EMA off with 0)")
    half_life = half_life_kimg * 1000.0  # in images
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


def make_ema(generator: nn.Module) -> nn.Module:
    """A frozen copy of `generator` (no gradients) to hold the average."""
    ema = copy.deepcopy(generator)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema_(ema: nn.Module, live: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * live for parameters; buffers copied from `live`."""
    ema_params, live_params = list(ema.parameters()), list(live.parameters())
    if len(ema_params) != len(live_params):
        raise ValueError("EMA and live generator have different parameters")  # an invariant, not user input
    torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - beta)
    for b_ema, b_live in zip(ema.buffers(), live.buffers(), strict=True):
        b_ema.copy_(b_live)

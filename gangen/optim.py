"""Optimizer helpers: DCGAN's default Adam, and rebuilding a user's optimizer as fused or capturable
(same class, groups and settings) for the GPU speed paths (README Speed)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def default_adam(params: Any) -> torch.optim.Optimizer:
    """DCGAN's optimizer: Adam, lr 2e-4, beta1 0.5 (Radford et al. 2015)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def use_fused(optimizer: torch.optim.Optimizer, device_types: tuple[str, ...] = ("cuda",)) -> torch.optim.Optimizer:
    """The same Adam / AdamW with fused=True (one kernel per step) when all its parameters are on
    `device_types` and the user chose neither `fused` nor `foreach`; anything else is returned as it is.
    The default is CUDA only: on CPU the default foreach Adam was as fast (README Speed)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    defaults = optimizer.defaults
    if (
        type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW)
        or not params
        or not all(p.device.type in device_types for p in params)
        or defaults.get("fused") is not None
        or defaults.get("foreach") is not None
        or defaults.get("differentiable")
    ):
        return optimizer
    return _rebuild(optimizer, fused=True)


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with capturable=True (its step counters on the device: a CUDA graph may replay
    its step), when it has that option; anything else (SGD: nothing to count) is returned as it is."""
    if "capturable" not in optimizer.defaults or optimizer.defaults["capturable"]:
        return optimizer
    return _rebuild(optimizer, capturable=True)


def _rebuild(optimizer: torch.optim.Optimizer, **options: Any) -> torch.optim.Optimizer:
    """A new optimizer of the same class, groups and settings, with `options` changed (before any step).

    Only the settings its constructor takes are passed: `defaults` can hold more (torch 2.14's AdamW
    inherits Adam's `decoupled_weight_decay`, which AdamW() refuses; its groups keep it).
    """
    cls = type(optimizer)
    takes = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in {**optimizer.defaults, **options}.items() if k in takes}
    return cls([{**group, **options} for group in optimizer.param_groups], **settings)

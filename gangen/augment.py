"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every discriminator input.

Real and generated batches pass through the same policy (the same ops, each image with its own random
parameters), and the G step back-propagates through the augmentation, so D never sees un-augmented images
and G is not taught to produce augmented ones. For small datasets (a few thousand images) where D
over-fits; on Fashion-MNIST's 60k images it is not needed.

Ops (images in [-1, 1]):
- color: brightness + U(-0.5, 0.5), saturation x U(0, 2) around the per-pixel channel mean, contrast
  x U(0.5, 1.5) around the image mean.
- translation: shift by up to 1/8 of the size in x and y, zero-padded.
- cutout: zero a square of half the size at a random position (it may stick out of the image).

Random parameters come from the policy's own torch.Generator (seeded), so the global RNG and the
latents are untouched and a seed reproduces the same augmentations.
"""

from __future__ import annotations

import numpy as np
import torch

from gangen.errors import ConfigError

OPS = ("color", "translation", "cutout")


def augment_seed(seed: int, rank: int) -> int:
    """The seed of a rank's augmentation stream: its own, derived from (seed, rank). The latents use
    seed + rank; seeding both with it made the two streams the same bits (torch.rand and torch.randn of one
    seed: correlation -0.36 element by element, -0.64 against the Box-Muller radius)."""
    entropy = [seed % 2**64, rank, 0x61756D]  # the last word names this stream
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class DiffAugment:
    """Callable policy: images (B, C, H, W) -> augmented images (B, C, H, W), differentiable in the input."""

    def __init__(
        self,
        policy: str = "",  # comma-separated ops from OPS, applied in that order; "" = identity
        seed: int = 0,  # seed of the augmentation's own random stream
        translation_ratio: float = 0.125,  # largest shift as a fraction of the image size
        cutout_ratio: float = 0.5,  # side of the cutout square as a fraction of the image size
    ) -> None:
        self.ops = [op.strip() for op in policy.split(",") if op.strip()]
        for op in self.ops:
            if op not in OPS:
                raise ConfigError(f"unknown augment op {op!r} in {policy!r}: use a comma list of {', '.join(OPS)}")
        self.seed, self.translation_ratio, self.cutout_ratio = seed, translation_ratio, cutout_ratio
        self._rng: torch.Generator | None = None
        # a checkpoint's generator state (device type, state), applied on first use on that device type
        self.pending_state: tuple[str, torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.ops)

    def rng(self, device: torch.device) -> torch.Generator:
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device).manual_seed(self.seed)
            if self.pending_state is not None and self.pending_state[0] == device.type:  # CUDA states fit CUDA only
                self._rng.set_state(self.pending_state[1].clone())  # never a view with a storage offset
            self.pending_state = None
        return self._rng

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = getattr(self, op)(x)
        return x

    def _rand(self, x: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=x.device, dtype=x.dtype, generator=self.rng(x.device))

    def color(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x + (self._rand(x, b, 1, 1, 1) - 0.5)  # brightness
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W); a no-op for greyscale
        x = (x - mean) * (self._rand(x, b, 1, 1, 1) * 2) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        return (x - mean) * (self._rand(x, b, 1, 1, 1) + 0.5) + mean  # contrast

    def _offsets(self, x: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """(B, 2) integer offsets in [low, high] for y and x, from the policy's generator."""
        return torch.randint(low, high + 1, (x.shape[0], 2), device=x.device, generator=self.rng(x.device))

    def translation(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        shift = int(min(h, w) * self.translation_ratio + 0.5)
        off = self._offsets(x, -shift, shift)  # (B, 2)
        rows = torch.arange(h, device=x.device)[None, :] + off[:, :1]  # (B, H) source row of each output row
        cols = torch.arange(w, device=x.device)[None, :] + off[:, 1:]  # (B, W)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
        index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # (B, H, W) flat source
        out = x.flatten(2).gather(2, index.flatten(1)[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
        return out * inside[:, None].to(x.dtype)  # zero padding outside the source image

    def cutout(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        size = int(min(h, w) * self.cutout_ratio + 0.5)
        centre = self._offsets(x, 0, min(h, w) - 1 + (1 - size % 2))  # (B, 2) centre of the square
        top_left = centre - size // 2
        rows = torch.arange(h, device=x.device)[None, :] - top_left[:, :1]  # (B, H)
        cols = torch.arange(w, device=x.device)[None, :] - top_left[:, 1:]  # (B, W)
        cut = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # (B, H, W)
        return x * (~cut)[:, None].to(x.dtype)

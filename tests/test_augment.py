"""DiffAugment: differentiable, the same policy for real and fake, seeded, and each op does what it says."""

from __future__ import annotations

import pytest
import torch

from gangen.augment import DiffAugment
from gangen.errors import ConfigError

POLICY = "color,translation,cutout"


def test_differentiable_everywhere():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    out = DiffAugment(POLICY, seed=1)(x)
    assert out.shape == x.shape
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert grad.abs().sum() > 0
    # gradients are exact: compare with a finite difference along a random direction
    xd = x.detach().double()
    aug = DiffAugment(POLICY, seed=1)
    f = lambda t: (DiffAugment(POLICY, seed=1)(t) * weights.double()).sum()  # noqa: E731
    direction = torch.randn_like(xd)
    eps = 1e-6
    numeric = (f(xd + eps * direction) - f(xd - eps * direction)) / (2 * eps)
    xg = xd.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xg), xg)
    assert (g * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-5)
    assert aug.ops == ["color", "translation", "cutout"]


def test_identical_for_real_and_fake():
    # one policy object is applied to both; with the same random state the transform of an image does
    # not depend on whether it is real or generated: the same batch gives the same output
    real = torch.randn(4, 1, 16, 16)
    fake = real.clone().requires_grad_(True)  # a "generated" batch carrying gradients
    a, b = DiffAugment(POLICY, seed=3), DiffAugment(POLICY, seed=3)
    torch.testing.assert_close(a(real), b(fake).detach())
    # its own generator: the global RNG is untouched, and successive calls draw fresh parameters
    state = torch.get_rng_state()
    first, second = a(real), a(real)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(first, second)


def test_translation_shifts_with_zero_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    aug = DiffAugment("translation", seed=0, translation_ratio=0.5)  # shifts of up to 2 pixels
    for _ in range(10):
        out = aug(x)[0, 0]
        kept = out[out != 0]
        # every kept pixel is a source pixel, and the rows / columns keep their order (a pure shift)
        assert set(kept.tolist()) <= set(x.flatten().tolist())
        nz = out.nonzero()
        dy, dx = (
            int(out[nz[0, 0], nz[0, 1]].item() - 1) // 4 - nz[0, 0],
            int(out[nz[0, 0], nz[0, 1]].item() - 1) % 4 - nz[0, 1],
        )
        ys, xs = nz[:, 0] + dy, nz[:, 1] + dx
        torch.testing.assert_close(out[nz[:, 0], nz[:, 1]], x[0, 0, ys, xs])


def test_cutout_zeroes_a_square():
    x = torch.ones(8, 1, 16, 16)
    out = DiffAugment("cutout", seed=0)(x)
    zeroed = (out == 0).flatten(1).sum(1)  # (B,)
    assert (zeroed > 0).all() and (zeroed <= 64).all()  # an 8x8 square, clipped at the border
    assert (zeroed == 64).any()


def test_color_keeps_greyscale_structure():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    out = DiffAugment("color", seed=0)(x)
    # brightness + contrast are affine per image: out = a x + b with a in [0.5, 1.5] * saturation factor
    for xi, oi in zip(x, out, strict=True):
        a = torch.linalg.lstsq(torch.stack([xi.flatten(), torch.ones(64)], 1), oi.flatten()[:, None]).solution
        torch.testing.assert_close(a[0, 0] * xi + a[1, 0], oi, atol=1e-5, rtol=1e-5)


def test_identity_and_bad_policy():
    x = torch.randn(2, 3, 8, 8)
    assert not DiffAugment("") and torch.equal(DiffAugment("")(x), x)
    with pytest.raises(ConfigError, match="unknown augment op 'flip'"):
        DiffAugment("color,flip")

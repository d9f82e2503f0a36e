"""DiffAugment: differentiable, the same policy for real and fake, seeded, and each op does what it says."""

from __future__ import annotations

import pytest
import torch

from gangen.augment import DiffAugment, augment_seed
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


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (H, W) read at (i + dy, j + dx), zero outside."""
    h, w = x.shape
    padded = torch.zeros(h + 8, w + 8)
    padded[4 : 4 + h, 4 : 4 + w] = x
    return padded[4 + dy : 4 + dy + h, 4 + dx : 4 + dx + w]


def test_translation_shifts_with_zero_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    aug = DiffAugment("translation", seed=0, translation_ratio=0.5)  # shifts of up to 2 pixels
    seen = set()
    for _ in range(30):
        out = aug(x)[0, 0]
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out, shifted(x[0, 0], dy, dx))]
        assert len(matches) == 1  # exactly one pure shift with zero padding
        seen.add(matches[0])
    assert len(seen) > 5  # shifts vary from call to call


def test_cutout_zeroes_a_square():
    x = torch.ones(8, 1, 16, 16)
    out = DiffAugment("cutout", seed=0)(x)
    zeroed = (out == 0).flatten(1).sum(1)  # (B,)
    assert (zeroed > 0).all() and (zeroed <= 64).all()  # an 8x8 square, clipped at the border
    assert (zeroed == 64).any()


def _centred(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x - x.mean(dim=dims, keepdim=True)


def _factor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, the least-squares k in y = k x (B,); asserts that y is k x."""
    k = (x * y).flatten(1).sum(1) / (x * x).flatten(1).sum(1)
    torch.testing.assert_close(y, k.view(-1, *[1] * (x.dim() - 1)) * x, atol=1e-5, rtol=1e-5)
    return k


def test_color_on_greyscale_is_brightness_then_contrast_in_their_ranges():
    """DiffAugment's color: brightness x + U(-0.5, 0.5), then contrast (x - image mean) x U(0.5, 1.5) + image mean
    (saturation is a no-op on one channel). So per image: out - mean(out) = c (x - mean(x)) with c in
    [0.5, 1.5], and mean(out) - mean(x) in [-0.5, 0.5]; every image draws its own c and shift."""
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    out = DiffAugment("color", seed=0)(x)
    contrast = _factor(_centred(x, (1, 2, 3)), _centred(out, (1, 2, 3)))
    brightness = out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))
    assert contrast.min() >= 0.5 - 1e-5 and contrast.max() <= 1.5 + 1e-5
    assert brightness.min() >= -0.5 - 1e-5 and brightness.max() <= 0.5 + 1e-5
    assert contrast.min() < 0.6 and contrast.max() > 1.4  # spread over the range (256 uniform draws)
    assert brightness.min() < -0.4 and brightness.max() > 0.4


def test_color_scales_saturation_around_the_channel_mean_in_its_range():
    """On RGB, saturation scales each pixel's spread around its channel mean by U(0, 2), and contrast scales it
    by c too. The channel mean itself moves as greyscale does (brightness, contrast c), which gives c: the
    saturation factor is (spread factor) / c."""
    x = torch.rand(256, 3, 8, 8) * 2 - 1
    out = DiffAugment("color", seed=0)(x)
    grey, grey_out = x.mean(dim=1), out.mean(dim=1)  # (B, H, W)
    contrast = _factor(_centred(grey, (1, 2)), _centred(grey_out, (1, 2)))
    brightness = grey_out.mean(dim=(1, 2)) - grey.mean(dim=(1, 2))
    saturation = _factor(_centred(x, (1,)), _centred(out, (1,))) / contrast
    assert contrast.min() >= 0.5 - 1e-5 and contrast.max() <= 1.5 + 1e-5
    assert brightness.min() >= -0.5 - 1e-5 and brightness.max() <= 0.5 + 1e-5
    assert saturation.min() >= 0 and saturation.max() <= 2 + 1e-4
    assert saturation.min() < 0.2 and saturation.max() > 1.8  # spread over the range (256 uniform draws)
    assert contrast.min() < 0.6 and contrast.max() > 1.4 and brightness.min() < -0.4 and brightness.max() > 0.4


def test_identity_and_bad_policy():
    x = torch.randn(2, 3, 8, 8)
    assert not DiffAugment("") and torch.equal(DiffAugment("")(x), x)
    with pytest.raises(ConfigError, match="unknown augment op 'flip'"):
        DiffAugment("color,flip")


def test_augmentation_stream_is_not_the_latents_stream():
    """Latents come from seed + rank; the augmentation had the same seed, so its draws were the latents'
    bits (torch.rand and torch.randn of one seed are dependent). Now each rank's augmentation seed is
    derived from (seed, rank) and collides with no latent seed of a run of up to 1024 processes."""
    for seed in (0, 5, 2**63, -1):
        seeds = {augment_seed(seed, rank) for rank in range(1024)}
        latent_seeds = {(seed + rank) % 2**64 for rank in range(1024)}
        assert len(seeds) == 1024 and not seeds & latent_seeds
        assert all(0 <= s < 2**64 for s in seeds)  # what manual_seed takes
    assert augment_seed(5, 1) == augment_seed(5, 1) != augment_seed(6, 0)  # reproducible, seed-dependent
    u = torch.rand(6400, generator=torch.Generator().manual_seed(augment_seed(5, 0)))
    z = torch.randn(6400, generator=torch.Generator().manual_seed(5))
    same_seed = torch.rand(6400, generator=torch.Generator().manual_seed(5))
    assert abs(torch.corrcoef(torch.stack([same_seed, z]))[0, 1]) > 0.3  # what it was
    assert abs(torch.corrcoef(torch.stack([u, z]))[0, 1]) < 0.05


def test_checkpoint_streams_resume_per_rank_and_from_older_files():
    """Every rank saves its own augmentation stream and resumes with it; files written before
    held rank 0's stream only, under another key, and still resume it; a stream of another device type is
    not forced onto this one (a CUDA state does not fit a CPU generator)."""
    from gangen.networks import DCGANDiscriminator, DCGANGenerator
    from gangen.system import GAN

    def model() -> GAN:
        g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
        return GAN(g, DCGANDiscriminator(resolution=16, channels=1, base_channels=8), augment="translation", seed=5)

    x = torch.rand(4, 1, 16, 16)
    live = model()
    live.configure_model()
    assert live.augment.seed == augment_seed(5, 0)  # rank 0 (no trainer)
    live.augment(x)  # advance the stream
    checkpoint = {"state_dict": live.state_dict()}
    live.on_save_checkpoint(checkpoint)
    saved = checkpoint["gangen"]
    assert saved["augment_rng_device"] == "cpu" and len(saved["augment_rng_states"]) == 1
    want = live.augment(x)
    older = {"augment_rng_state": saved["augment_rng_states"][0]}  # the one key older files have
    for state in (saved, older):
        resumed = model()
        resumed.augment(x)  # a stream already in use is replaced by the checkpoint's
        resumed.on_load_checkpoint({"gangen": state})
        assert torch.equal(resumed.augment(x), want)
    cuda_state = {"augment_rng_device": "cuda", "augment_rng_states": [torch.zeros(16, dtype=torch.uint8)]}
    fresh = model()
    fresh.on_load_checkpoint({"gangen": cuda_state})
    assert torch.equal(fresh.augment(x), model().augment(x))  # a fresh CPU stream, not a crash

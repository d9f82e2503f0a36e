"""Networks: shapes over every option, initialisation, specs."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gangen.errors import ConfigError
from gangen.layers import bilinear_kernel, init_bilinear_
from gangen.networks import DCGANDiscriminator, DCGANGenerator, build_network, network_spec

RESOLUTIONS = (16, 32, 64, 128, 256)


@pytest.mark.parametrize(
    "resolution,upsample,norm,channels",
    list(
        itertools.product(RESOLUTIONS, ("transposed", "bilinear_transposed", "resize_conv"), ("batch", "none"), (1, 3))
    ),
)
def test_generator_shapes(resolution, upsample, norm, channels):
    g = DCGANGenerator(
        latent_dim=16, resolution=resolution, channels=channels, base_channels=4, upsample=upsample, norm=norm
    )
    x = g(torch.randn(2, 16))
    assert x.shape == (2, channels, resolution, resolution)
    assert x.abs().max() <= 1.0  # tanh output
    assert g(torch.randn(2, 16, 1, 1)).shape == x.shape  # (B, latent, 1, 1) is accepted too


@pytest.mark.parametrize(
    "resolution,norm,channels", list(itertools.product(RESOLUTIONS, ("batch", "spectral", "none"), (1, 3)))
)
def test_discriminator_shapes(resolution, norm, channels):
    d = DCGANDiscriminator(resolution=resolution, channels=channels, base_channels=4, norm=norm)
    logits = d(torch.randn(3, channels, resolution, resolution))
    assert logits.shape == (3,)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert has_bn == (norm == "batch")
    has_sn = any(hasattr(m, "parametrizations") for m in d.modules())
    assert has_sn == (norm == "spectral")


def test_dcgan_64_matches_the_paper_widths():
    g = DCGANGenerator(resolution=64, channels=3)
    widths = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert widths == [512, 256, 128, 64, 3]
    d = DCGANDiscriminator(resolution=64, channels=3)
    assert [m.out_channels for m in d.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]


def test_width_cap():
    g = DCGANGenerator(resolution=256, base_channels=64, max_channels=256)
    assert max(m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)) == 256


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    g = DCGANGenerator(resolution=64)
    convs = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)])
    bn = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.mean()) < 1e-3 and abs(convs.std() - 0.02) < 1e-3
    assert abs(bn.mean() - 1) < 5e-3 and abs(bn.std() - 0.02) < 5e-3


def test_bilinear_kernel_taps():
    k = bilinear_kernel(4)
    assert torch.allclose(k[0], torch.tensor([0.25, 0.75, 0.75, 0.25]) * 0.25)
    assert torch.allclose(k.sum(), torch.tensor(4.0))  # stride 2 in 2-D: each input feeds 4 outputs


def _smooth(b, c, h):
    """A smooth (B, C, h, h) input: low-frequency sinusoids, different per channel."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, h), indexing="ij")
    out = [torch.sin(2 * x + 0.3 * i) * torch.cos(1.5 * y - 0.2 * i) for i in range(b * c)]
    return torch.stack(out).view(b, c, h, h)


@pytest.mark.parametrize("c_in,c_out", [(8, 8), (8, 4), (6, 3), (4, 1)])
def test_bilinear_init_reproduces_bilinear_upsampling(c_in, c_out):
    conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)
    init_bilinear_(conv)
    x = _smooth(2, c_in, 12)  # (B, C_in, 12, 12)
    y = conv(x)  # (B, C_out, 24, 24)
    group_mean = torch.stack([x[:, j::c_out].mean(1) for j in range(c_out)], 1)  # (B, C_out, 12, 12)
    expected = F.interpolate(group_mean, scale_factor=2, mode="bilinear", align_corners=False)
    # identical away from the border, where the transposed conv sees zero padding
    assert torch.allclose(y[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(y[..., 0, :], expected[..., 0, :], atol=1e-3)  # border differs: the test bites


def test_bilinear_transposed_generator_uses_bilinear_kernels():
    g = DCGANGenerator(resolution=32, base_channels=8, upsample="bilinear_transposed")
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2)]
    assert len(ups) == 3
    for conv in ups:
        c_in, c_out = conv.weight.shape[:2]
        for i in range(c_in):
            group = len(range(i % c_out, c_in, c_out))  # inputs averaged into output channel i % c_out
            assert torch.allclose(conv.weight[i, i % c_out], bilinear_kernel(4) / group)
    plain = DCGANGenerator(resolution=32, base_channels=8, upsample="transposed")
    assert not any(
        torch.allclose(m.weight[0, 0], bilinear_kernel(4)) for m in plain.modules() if isinstance(m, nn.ConvTranspose2d)
    )


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"resolution": 48}, "48"),
        ({"resolution": 8}, "8"),
        ({"resolution": 512}, "512"),
        ({"upsample": "pixelshuffle"}, "pixelshuffle"),
        ({"norm": "layer"}, "layer"),
        ({"channels": 2}, "2"),
    ],
)
def test_generator_bad_input(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        DCGANGenerator(**kwargs)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_discriminator_bad_norm():
    with pytest.raises(ConfigError, match="'group'.*'batch', 'spectral', 'none'"):
        DCGANDiscriminator(norm="group")


def test_spec_roundtrip():
    g = DCGANGenerator(resolution=16, channels=1, base_channels=8, upsample="resize_conv")
    spec = network_spec(g)
    assert spec["class_path"] == "gangen.networks.DCGANGenerator"
    rebuilt = build_network(spec)
    rebuilt.load_state_dict(g.state_dict())
    z = torch.randn(4, 100)
    g.eval(), rebuilt.eval()
    assert torch.equal(g(z), rebuilt(z))


@pytest.mark.parametrize("class_path", ["os.system", "builtins.dict", "gangen.nothing.Here", "json.JSONDecoder"])
def test_build_network_refuses_non_modules(class_path):
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_network({"class_path": class_path, "init_args": {}})

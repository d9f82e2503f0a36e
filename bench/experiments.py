"""Candidate speed-ups of the GPU-bound step, tried end to end before any goes into gangen.

    python bench/experiments.py                  # check each against the layers it replaces (CPU or CUDA)
    python bench/throughput.py --device cuda --batch_size 1024 --variants gangen exp_gemm_image exp_bn_act

Each experiment patches a built `GAN` in place (same parameters, same state_dict keys, so the fit loop, the
CUDA-graph capture and checkpoints are untouched); bench/throughput.py runs it as a variant (`exp_<name>`).
They target the items of the batch-1024 H200 profile (README Speed):

- gemm_image: the two layers that touch the image channels (1 for Fashion-MNIST) as one matrix product
  each. cuDNN is slow for a 1-channel conv (3.5 ms forward + backward for D's first layer at batch 1024,
  against well under 1 ms of memory traffic). D's first conv becomes im2col (one strided copy of the padded
  NHWC input into (B*Ho*Wo, C*k*k) rows) then addmm with the bias, whose (B*Ho*Wo, O) result is already
  the NHWC output; G's last transposed conv becomes a matrix product of the NHWC input rows with the
  (Ci, Co*k*k) weight, then col2im (F.fold) and the bias.
- bn_act: every BatchNorm2d + ReLU / LeakyReLU pair as one torch.compile'd function (Inductor fuses the
  statistics, the normalisation and the activation, and their backward), the networks themselves eager.
- nchw_image_strides: not a speed-up but the baseline of one already in gangen: 1-channel images reach D
  with NCHW strides again, as before gangen.layers.nhwc_strides.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conv2d_gemm(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a zero-padded, ungrouped, undilated Conv2d as im2col + addmm; the output is NHWC."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if torch.is_autocast_enabled(x.device.type):  # cast before im2col, as a conv casts its input: 4x less copied
        x = x.to(torch.get_autocast_dtype(x.device.type))
    patches = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (n, c, ho, wo, kh, kw), a view
    rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)  # one copy: im2col
    weight = conv.weight.reshape(conv.out_channels, c * kh * kw)  # (O, C*kh*kw) in the (c, kh, kw) order
    out = torch.mm(rows, weight.t()) if conv.bias is None else torch.addmm(conv.bias, rows, weight.t())
    return out.view(n, ho, wo, conv.out_channels).permute(0, 3, 1, 2)  # (n, O, ho, wo) with NHWC strides


def conv_transpose2d_gemm(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a zero-padded, ungrouped ConvTranspose2d as a matrix product then col2im (F.fold)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    co = conv.out_channels
    ho, wo = (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for an NHWC input
    cols = torch.mm(rows, conv.weight.reshape(c, co * kh * kw))  # (n*h*w, Co*kh*kw)
    cols = cols.view(n, h * w, co * kh * kw).transpose(1, 2)  # (n, Co*kh*kw, L), as F.fold reads it
    out = F.fold(cols, (ho, wo), (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (n, Co, ho, wo)
    return out if conv.bias is None else out + conv.bias.view(1, co, 1, 1)


def _gemm_ok(conv: nn.Module) -> bool:
    plain = conv.groups == 1 and conv.padding_mode == "zeros" and conv.dilation == (1, 1)
    return plain and isinstance(conv.padding, tuple) and getattr(conv, "output_padding", (0, 0)) == (0, 0)


def gemm_image(model: nn.Module) -> None:
    """D's first conv and G's last (transposed) conv, the image-channel layers, as matrix products."""
    first = next(m for m in model.discriminator.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in model.generator.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    for layer, fn in ((first, conv2d_gemm), (last, conv_transpose2d_gemm)):
        if not _gemm_ok(layer) or (layer is last and last.out_channels > 4):
            raise ValueError(f"gemm_image does not apply to {layer}")
        layer.forward = types.MethodType(fn, layer)  # the instance's forward: parameters and keys unchanged


def bn_act(model: nn.Module) -> None:
    """Each BatchNorm2d directly followed by a ReLU / LeakyReLU in a Sequential: one compiled function."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one entry per BN
    fused = 0
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        for bn, act in zip(list(seq)[:-1], list(seq)[1:], strict=True):
            if isinstance(bn, nn.BatchNorm2d) and isinstance(act, (nn.ReLU, nn.LeakyReLU)):
                slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
                bn.forward = torch.compile(_bn_act_fn(bn.forward, slope), dynamic=False)
                act.forward = types.MethodType(lambda self, x: x, act)  # applied inside the BN's function
                fused += 1
    if not fused:
        raise ValueError("bn_act found no BatchNorm2d + ReLU / LeakyReLU pair")


def _bn_act_fn(bn_forward: Callable, slope: float) -> Callable:
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = bn_forward(x)
        return F.relu(y) if slope == 0.0 else F.leaky_relu(y, slope)

    return fn


def nchw_image_strides(model: nn.Module) -> None:
    """The layout before gangen.layers.nhwc_strides: 1-channel images reach D with the NCHW strides that
    `.contiguous(memory_format=torch.channels_last)` leaves them (a paired baseline for what it saves)."""
    import gangen.system

    gangen.system.nhwc_strides = lambda x: x  # this process only: each throughput variant is its own process


LAYER_EXPERIMENTS = {"gemm_image": gemm_image, "bn_act": bn_act}  # replace layers: checked by check()
EXPERIMENTS: dict[str, Callable[[nn.Module], None]] = {**LAYER_EXPERIMENTS, "nchw_image_strides": nchw_image_strides}


def apply(model: nn.Module, names: list[str]) -> None:
    for name in names:
        EXPERIMENTS[name](model)


def check(device: str, channels: int = 1, n: int = 8) -> None:
    """Each layer experiment against the layers it replaces: outputs and gradients, fp32 and NHWC as in training."""
    from gangen.networks import DCGANDiscriminator, DCGANGenerator

    torch.manual_seed(0)
    for name in LAYER_EXPERIMENTS:
        g = DCGANGenerator(latent_dim=16, resolution=32, channels=channels, base_channels=8).to(device)
        d = DCGANDiscriminator(resolution=32, channels=channels, base_channels=8).to(device)
        model = nn.Module()
        model.generator, model.discriminator = g, d
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        z = torch.randn(n, 16, device=device)
        results = []
        for patched in (False, True):
            model.load_state_dict(ref)
            model.to(memory_format=torch.channels_last)
            if patched:
                apply(model, [name])
            out = d(g(z)).square().mean()
            grads = torch.autograd.grad(out, list(model.parameters()))
            results.append((out.detach(), grads, [b.clone() for b in model.buffers()]))
        (o0, g0, b0), (o1, g1, b1) = results
        err = max((a - b).abs().max().item() / (a.abs().max().item() + 1e-12) for a, b in zip(g0, g1, strict=True))
        buf = max(((a - b).abs().max().item() for a, b in zip(b0, b1, strict=True) if a.is_floating_point()), default=0)
        print(f"{name} on {device}: loss {o0.item():.6g} vs {o1.item():.6g}, largest relative gradient error "
              f"{err:.2e}, largest buffer difference {buf:.2e}")  # fmt: skip
        if not torch.allclose(o0, o1, rtol=1e-4, atol=1e-6) or err > 1e-3 or buf > 1e-5:
            raise SystemExit(f"{name} does not match the layers it replaces on {device}")


if __name__ == "__main__":
    check("cuda" if torch.cuda.is_available() else "cpu")

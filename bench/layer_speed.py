"""Forward + backward time of each layer of the 64x64 DCGAN, on a GPU, to find where a GPU-bound step goes.

    python bench/layer_speed.py --batch_size 1024            # bf16 autocast, NHWC and NCHW
    python bench/layer_speed.py --batch_size 128 --channels 3
    python bench/layer_speed.py --device cpu --batch_size 64 --iters 5

For every conv / transposed conv of gangen's DCGANGenerator and DCGANDiscriminator (width 64) it times, with
CUDA events over `--iters` runs after warm-up: the forward alone and forward + backward (input and weight
gradients, from a fixed random gradient of the output: no loss kernels in the time), in each memory
format. For the layers with `--channels` (1 for Fashion-MNIST) image channels,
which tensor-core convolutions cannot serve directly, it also times the same maths with the image channels
zero-padded to 8 (padded weight for the generator's last layer, padded input and weight for the
discriminator's first): the result is the same up to the zero terms; and both as matrix products
(bench/experiments.py gemm_image: im2col + addmm, and a matrix product + col2im). Also: each network's BatchNorm +
activation pair and the discriminator's first conv + bias + LeakyReLU (with `--compile` also as
torch.compile'd blocks, which fuse the elementwise work), and each whole network's forward + backward.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gangen.layers import nhwc_strides  # noqa: E402
from gangen.networks import DCGANDiscriminator, DCGANGenerator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import conv2d_gemm, conv_transpose2d_gemm  # noqa: E402


def timed(fn: Callable[[], object], iters: int, device: str, warmup: int = 3) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def fwd_bwd(module: Callable, x: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    """Forward, then the input and weight gradients from a fixed random output gradient (made once, in the
    output's dtype and layout, as the next layer would hand it back)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        grad_out = torch.randn_like(module(x))

    def run() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = module(x)
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        del grads

    return run


def fwd(module: Callable, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            module(x)

    return run


def padded_g_last(last: nn.ConvTranspose2d, c: int, fmt: torch.memory_format) -> tuple[Callable, list]:
    """The generator's last layer with its `c` output channels zero-padded to 8; (function, its parameters)."""
    w, b = last.weight.detach().clone().requires_grad_(), last.bias.detach().clone().requires_grad_()  # (64, c, 4, 4)

    def run(x: torch.Tensor) -> torch.Tensor:
        wp = F.pad(w, (0, 0, 0, 0, 0, 8 - c)).contiguous(memory_format=fmt)  # (64, 8, 4, 4)
        return F.conv_transpose2d(x, wp, F.pad(b, (0, 8 - c)), stride=2, padding=1)[:, :c]

    return run, [w, b]


def padded_d_first(first: nn.Conv2d, c: int, fmt: torch.memory_format) -> tuple[Callable, list]:
    """The discriminator's first layer with its `c` input channels zero-padded to 8 (input and weight)."""
    w, b = first.weight.detach().clone().requires_grad_(), first.bias.detach().clone().requires_grad_()  # (64, c, 4, 4)

    def run(x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, (0, 0, 0, 0, 0, 8 - c)).contiguous(memory_format=fmt)  # (n, 8, 64, 64)
        wp = F.pad(w, (0, 0, 0, 0, 0, 8 - c)).contiguous(memory_format=fmt)
        return F.conv2d(xp, wp, b, stride=2, padding=1)

    return run, [w, b]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--formats", nargs="+", default=["NHWC", "NCHW"], choices=["NHWC", "NCHW"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (compiles for minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    n, c, dev = args.batch_size, args.channels, args.device
    g = DCGANGenerator(latent_dim=100, resolution=64, channels=c, base_channels=64).to(dev)
    d = DCGANDiscriminator(resolution=64, channels=c, base_channels=64).to(dev)
    where = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}, torch {torch.__version__}, batch {n}, 64x64, {c} channel(s), bf16 autocast, median of "
          f"{args.iters} runs in ms")  # fmt: skip
    print(f"{'layer':<44} {'format':<6} {'fwd':>7} {'fwd+bwd':>8}")
    formats = {"NHWC": torch.channels_last, "NCHW": torch.contiguous_format}
    for fmt_name, fmt in ((name, formats[name]) for name in args.formats):
        g.to(memory_format=fmt)
        d.to(memory_format=fmt)

        def row(name: str, module: Callable, x: torch.Tensor, params: list, fmt_name: str = fmt_name) -> None:
            print(f"{name[:44]:<44} {fmt_name:<6} {timed(fwd(module, x), args.iters, dev):7.3f} "
                  f"{timed(fwd_bwd(module, x, params), args.iters, dev):8.3f}")  # fmt: skip

        def image(*shape: int, fmt: torch.memory_format = fmt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            return (nhwc_strides(x) if fmt == torch.channels_last else x).requires_grad_()  # as GAN._d gives D

        size = 1
        for layer in g.net:
            if isinstance(layer, nn.ConvTranspose2d):
                row(f"G {layer}", layer, image(n, layer.in_channels, size, size), list(layer.parameters()))
                size = 4 if size == 1 else size * 2
        size = 64
        for layer in d.net:
            if isinstance(layer, nn.Conv2d):
                row(f"D {layer}", layer, image(n, layer.in_channels, size, size), list(layer.parameters()))
                size //= 2
        if fmt == torch.channels_last and c == 1:  # the strides `.contiguous(channels_last)` leaves 1 channel
            x = torch.randn(n, c, 64, 64, device=dev).contiguous(memory_format=fmt).requires_grad_()
            row("D first, 1-channel input with NCHW strides", d.net[0], x, list(d.net[0].parameters()))
        run, params = padded_d_first(d.net[0], c, fmt)
        row("D first, image channels padded to 8", run, image(n, c, 64, 64), params)
        run, params = padded_g_last(g.net[-2], c, fmt)
        row("G last, image channels padded to 8", run, image(n, 64, 32, 32), params)
        first, last = d.net[0], g.net[-2]
        row("D first as im2col + GEMM", functools.partial(conv2d_gemm, first), image(n, c, 64, 64),
            [*first.parameters()])  # fmt: skip
        row("G last as GEMM + col2im", functools.partial(conv_transpose2d_gemm, last), image(n, 64, 32, 32),
            [*last.parameters()])  # fmt: skip
        for name, bn, act, shape in (  # batchnorm + activation, the largest of each network
            ("G BatchNorm2d(64) + ReLU", nn.BatchNorm2d(64).to(dev), nn.ReLU(), (n, 64, 32, 32)),
            ("D BatchNorm2d(128) + LeakyReLU", nn.BatchNorm2d(128).to(dev), nn.LeakyReLU(0.2), (n, 128, 16, 16)),
        ):
            block, x = nn.Sequential(bn, act).to(memory_format=fmt), image(*shape, dtype=torch.bfloat16)
            row(name, block, x, list(bn.parameters()))
            if args.compile:  # inductor fuses statistics, normalisation and activation (and their backward)
                row(f"{name}, compiled", torch.compile(block), x, list(bn.parameters()))
        first = nn.Sequential(d.net[0], d.net[1])  # conv with bias (added by a separate kernel) + LeakyReLU
        row("D first conv + bias + LeakyReLU", first, image(n, c, 64, 64), list(first.parameters()))
        if args.compile:
            row("D first conv + bias + LeakyReLU, compiled", torch.compile(first), image(n, c, 64, 64),
                list(first.parameters()))  # fmt: skip
        row("G whole", g, torch.randn(n, 100, device=dev, requires_grad=True), list(g.parameters()))
        row("D whole", d, image(n, c, 64, 64), list(d.parameters()))


if __name__ == "__main__":
    main()

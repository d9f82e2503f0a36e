"""The baseline: a DCGAN training loop in the style of the widely copied pytorch/examples dcgan/main.py.

What makes it "classic": a torchvision-style dataset that hands out one PIL image per item, PIL transforms
(Resize, ToTensor, Normalize) run per image in DataLoader workers, fp32, default memory format, Adam(2e-4,
beta1 0.5) without fused kernels, BCE on sigmoid outputs, real and fake discriminator losses backpropagated
separately, and `.item()` of D(x), D(G(z)) read every iteration (a host sync on a GPU). The networks are the
DCGAN paper's (ngf = ndf = 64 by default), the same as gangen's DCGANGenerator / DCGANDiscriminator.

    python bench/classic_dcgan.py --steps 20 --batch_size 64        # prints images/s and peak memory
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

FMNIST = Path("/usr/share/datasets/fashion-mnist")


class FashionMNISTLike(Dataset):
    """Like torchvision.datasets.FashionMNIST: uint8 (N, 28, 28) in memory, a PIL image per item."""

    def __init__(self, root: Path, transform: T.Compose) -> None:
        with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
            self.data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
            self.targets = np.frombuffer(f.read(), np.uint8, offset=8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.data[index], mode="L")  # as torchvision's MNIST does
        return self.transform(image), int(self.targets[index])


def weights_init(m: nn.Module) -> None:
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def generator(nz: int, ngf: int, nc: int) -> nn.Sequential:
    """z (B, nz, 1, 1) -> (B, nc, 64, 64)."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),  # 4x4
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 8x8
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 16x16
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 32x32
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),  # 64x64
    )  # fmt: skip


def discriminator(ndf: int, nc: int) -> nn.Sequential:
    """(B, nc, 64, 64) -> probabilities (B, 1, 1, 1)."""
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),  # 32x32
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(),  # 1x1
    )  # fmt: skip


def classic_dataset(root: Path, resolution: int = 64) -> tuple[Dataset, int]:
    """The example's dataset and its channel count: Fashion-MNIST (1) when `root` holds its IDX files, else
    an image folder (3) read by torchvision's ImageFolder (the example's --dataset folder / celeba): one PIL
    image per item, Resize / CenterCrop / ToTensor / Normalize to [-1, 1]."""
    nc = 1 if (Path(root) / "train-images-idx3-ubyte.gz").is_file() else 3
    half = (0.5,) * nc
    transform = T.Compose([T.Resize(resolution), T.CenterCrop(resolution), T.ToTensor(), T.Normalize(half, half)])
    if nc == 1:
        return FashionMNISTLike(Path(root), transform), nc
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform), nc


def train(
    root: Path = FMNIST,  # Fashion-MNIST's IDX files, or an image folder (RGB, as the example's CelebA run)
    batch_size: int = 64,  # images per step
    steps: int = 20,  # timed steps
    warmup: int = 3,  # untimed steps first
    workers: int = 2,  # DataLoader workers (the example's default)
    device: str = "cpu",  # cpu | cuda
    width: int = 64,  # ngf = ndf
    nz: int = 100,  # latent size
) -> dict[str, float]:
    """Run warmup + steps iterations of the classic loop; images/s of the timed steps."""
    torch.manual_seed(0)
    dataset, nc = classic_dataset(root)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    dev = torch.device(device)
    net_g, net_d = generator(nz, width, nc).to(dev), discriminator(width, nc).to(dev)
    net_g.apply(weights_init)
    net_d.apply(weights_init)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    start, images, step = 0.0, 0, 0
    while step < warmup + steps:
        for data, _ in loader:
            if step == warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start, images = time.perf_counter(), 0
            # (1) update D: maximize log(D(x)) + log(1 - D(G(z)))
            net_d.zero_grad()
            real = data.to(dev)
            b = real.size(0)
            label = torch.full((b,), 1.0, dtype=torch.float, device=dev)
            output = net_d(real).view(-1)
            err_d_real = criterion(output, label)
            err_d_real.backward()
            d_x = output.mean().item()
            noise = torch.randn(b, nz, 1, 1, device=dev)
            fake = net_g(noise)
            label.fill_(0.0)
            output = net_d(fake.detach()).view(-1)
            err_d_fake = criterion(output, label)
            err_d_fake.backward()
            d_g_z1 = output.mean().item()
            opt_d.step()
            # (2) update G: maximize log(D(G(z)))
            net_g.zero_grad()
            label.fill_(1.0)
            output = net_d(fake).view(-1)
            err_g = criterion(output, label)
            err_g.backward()
            d_g_z2 = output.mean().item()
            opt_g.step()
            images += b
            step += 1
            if step == warmup + steps:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"img_s": images / seconds, "seconds": seconds, "d_x": d_x, "d_g_z": (d_g_z1 + d_g_z2) / 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=FMNIST)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    result = train(args.root, args.batch_size, args.steps, args.warmup, args.workers, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

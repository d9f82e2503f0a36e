"""A CelebA-like image folder for the data-path benchmarks, made offline from Fashion-MNIST.

Each image is a Fashion-MNIST item scaled to 178 x 218 (CelebA's aligned size), tinted to RGB and saved as a
JPEG of quality 95, in one subfolder per class (torchvision's ImageFolder layout). What matters for timing is
the decode and resize cost per file, which is CelebA's; the content is not.

    python bench/make_image_folder.py /tmp/celeba_like --num_images 20000
    python bench/throughput.py --root /tmp/celeba_like --variants gangen gangen_pil
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--num_images", type=int, default=20000)
    p.add_argument("--fmnist", type=Path, default=FMNIST)
    args = p.parse_args()
    with gzip.open(args.fmnist / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(args.fmnist / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    tint = np.random.default_rng(0).uniform(0.5, 1.0, (10, 3))  # one RGB tint per class
    for i in range(args.num_images):
        k = i % len(images)
        grey = np.asarray(Image.fromarray(images[k]).resize((178, 218), Image.Resampling.BILINEAR), np.float32)
        rgb = (grey[..., None] * tint[labels[k]]).astype(np.uint8)  # (218, 178, 3)
        out = args.folder / f"class{labels[k]}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(out, quality=95)
    print(f"wrote {args.num_images} JPEGs of 178x218 under {args.folder}")


if __name__ == "__main__":
    main()

"""The data path alone: training batches per second from an image folder, with no model, on the CPU.

What it bounds: a GPU step that takes less time than a batch takes to load waits for the loader. The rows:
- classic: torchvision ImageFolder + Resize / CenterCrop / ToTensor / Normalize per image in `--workers`
  DataLoader workers (the pytorch/examples DCGAN loader);
- gangen_pil: gangen's ImageDataModule with `--data.cache false` (one PIL decode per image, `--workers`);
- gangen_cache: gangen's default (`cache auto`): decoded once into a uint8 array (timed apart, as
  "setup"), then a batch is one gather from it, in the main process (num_workers 0);
- gangen_on_device: the same cache as DeviceBatches on the CPU (what a GPU run builds on the GPU).
Each row runs in its own process, repeats alternate the order; a fresh cache folder per run.

    python bench/make_image_folder.py /tmp/celeba_like --num_images 20000
    python bench/loader_speed.py --root /tmp/celeba_like --batches 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("classic", "gangen_pil", "gangen_cache", "gangen_on_device")


def batches(args: argparse.Namespace, name: str) -> tuple[object, float]:
    """(an iterable of training batches, seconds of setup) for one row."""
    start = time.perf_counter()
    if name == "classic":
        from classic_dcgan import classic_dataset
        from torch.utils.data import DataLoader

        dataset, _ = classic_dataset(args.root, args.resolution)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        return loader, time.perf_counter() - start
    from gangen.data import ImageDataModule

    pil = name == "gangen_pil"
    dm = ImageDataModule(
        dataset="image_folder", root=str(args.root), resolution=args.resolution, channels=3,
        batch_size=args.batch_size, num_workers=args.workers if pil else 0, cache=not pil, on_device=False,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.device_batches("cpu") if name == "gangen_on_device" else dm.train_dataloader()
    return loader, time.perf_counter() - start


def run(args: argparse.Namespace, name: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GANGEN_CACHE_DIR"] = tmp
        loader, setup_s = batches(args, name)
        n, images, start = 0, 0, 0.0
        while n < args.warmup + args.batches:
            for x, _ in loader:  # (B, 3, R, R) float32 in [-1, 1]
                n += 1
                if n == args.warmup:
                    start = time.perf_counter()
                elif n > args.warmup:
                    images += x.shape[0]
                if n == args.warmup + args.batches:
                    break
        return {"img_s": images / (time.perf_counter() - start), "setup_s": setup_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="an image folder (bench/make_image_folder.py)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (workers starting)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of classic and gangen_pil")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args, args.child)))
        return
    print(f"{os.cpu_count()} CPUs, {args.root}, {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{args.batches} timed batches after {args.warmup}, workers {args.workers}", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in args.rows}
    for rep in range(args.repeats):
        for name in args.rows if rep % 2 == 0 else args.rows[::-1]:
            keys = ("root", "resolution", "batch_size", "batches", "warmup", "workers")
            cmd = [sys.executable, __file__, "--child", name, *(f"--{k}={getattr(args, k)}" for k in keys)]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  rep{rep} {name}: {results[name][-1]['img_s']:.0f} img/s", flush=True)
    base = statistics.median(r["img_s"] for r in results.get("classic", [])) if "classic" in results else None
    print(f"\n{'row':<17} {'img/s median':>12} {'min-max':>15} {'x classic':>9} {'setup s':>8}")
    for name, runs in results.items():
        speeds = [r["img_s"] for r in runs]
        ratio = f"{statistics.median(speeds) / base:9.1f}" if base else f"{'':>9}"
        print(f"{name:<17} {statistics.median(speeds):12.0f} {min(speeds):7.0f}-{max(speeds):<7.0f} {ratio} "
              f"{statistics.median(r['setup_s'] for r in runs):8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()

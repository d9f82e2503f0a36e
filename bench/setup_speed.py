"""What a large dataset costs before the first batch: the one-time decode of an image folder, a later run's
setup from its cache, and LSUN's key listing at LSUN's scale.

- `--root DIR`: an image folder (bench/make_image_folder.py writes a CelebA-like one; CelebA has 202,599
  images). Times the scan (ImageDataModule construction), the decode once (prepare_data, into a fresh cache
  folder, on all CPU cores), then a second module's construction + setup (the scan again, the files' stats
  for the cache key, the memory map), and the process's anonymous memory (its own, without the cache file's
  pages, which peak RSS would count) before and at its peak during the decode.
- `--lsun_keys N`: an lmdb database of N keys of 40 hex characters, as LSUN's (bedroom's train set has
  3,033,042), with 8-byte values (the listing reads no values), then the time and memory of
  gangen.readers.LmdbImages listing them, and of 1000 key lookups by index.

    python bench/make_image_folder.py /tmp/celeba_like --num_images 202599
    python bench/setup_speed.py --root /tmp/celeba_like
    python bench/setup_speed.py --lsun_keys 3033042
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class AnonPeak:
    """Peak anonymous resident memory (this process's own: not the mapped files or page cache that peak RSS
    also counts) between reset() and peak(), sampled every 20 ms from /proc/self/status (Linux)."""

    def __init__(self) -> None:
        self.mib = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> float:
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return float("nan")
        return int(line.split()[1]) / 1024

    def _sample(self) -> None:
        while True:
            self.mib = max(self.mib, self.now())
            time.sleep(0.02)

    def reset(self) -> None:
        self.mib = self.now()

    def peak(self) -> float:
        return max(self.mib, self.now())


def image_folder(root: Path, resolution: int) -> None:
    from gangen.data import ImageDataModule

    def module() -> ImageDataModule:
        return ImageDataModule(dataset="image_folder", root=str(root), resolution=resolution, channels=3,
                               batch_size=128, cache_dir=cache)  # fmt: skip

    memory = AnonPeak()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        dm = module()
        scan = time.perf_counter() - start
        before = memory.now()
        memory.reset()
        start = time.perf_counter()
        dm.prepare_data()
        build = time.perf_counter() - start
        built = memory.peak()
        start = time.perf_counter()
        again = module()
        again.setup("fit")
        load = time.perf_counter() - start
        images = again._split("train").images
        print(f"{len(dm._files)} images, {resolution}x{resolution}, {os.cpu_count()} CPUs: scan {scan:.1f} s; "
              f"decode once {build:.1f} s ({len(dm._files) / build:.0f} img/s, {images.nbytes / 2**30:.2f} GiB); "
              f"anonymous memory {before:.0f} -> peak {built:.0f} MiB during it; "
              f"next run's scan + stats + load {load:.1f} s")  # fmt: skip


def lsun_keys(n: int) -> None:
    import lmdb

    from gangen.readers import LmdbImages

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bedroom_train_lmdb"
        env = lmdb.open(str(folder), map_size=max(1 << 30, n * 256))
        start = time.perf_counter()
        with env.begin(write=True) as txn:
            for i in range(n):
                txn.put(hashlib.sha1(str(i).encode()).hexdigest().encode(), b"x" * 8)
        env.close()
        size = (folder / "data.mdb").stat().st_size / 2**20
        print(f"wrote {n} keys in {time.perf_counter() - start:.1f} s ({size:.0f} MiB database)")
        memory = AnonPeak()
        before = memory.now()
        start = time.perf_counter()
        data = LmdbImages([folder], 64, 3)
        listed = time.perf_counter() - start
        during, after = memory.peak(), memory.now()
        step = max(1, n // 1000)
        start = time.perf_counter()
        for i in range(0, n, step):
            data._keys[data._ends[i - 1] if i else 0 : data._ends[i]]
        lookup = time.perf_counter() - start
        held = (len(data._keys) + data._ends.nbytes + data._labels.nbytes) / 2**20
        print(f"LmdbImages listed {len(data)} keys in {listed:.2f} s; holds {held:.0f} MiB (keys, offsets, "
              f"labels); anonymous memory {before:.0f} -> peak {during:.0f} -> {after:.0f} MiB; "
              f"{len(range(0, n, step))} lookups by index {lookup * 1e3:.1f} ms")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="an image folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--lsun_keys", type=int, help="list this many keys from a synthetic LSUN database")
    args = p.parse_args()
    if args.root is None and args.lsun_keys is None:
        p.error("pass --root DIR and/or --lsun_keys N")
    if args.root is not None:
        image_folder(args.root, args.resolution)
    if args.lsun_keys is not None:
        lsun_keys(args.lsun_keys)


if __name__ == "__main__":
    main()

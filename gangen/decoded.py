"""Decode once: a file dataset (image_folder, celeba, lsun) decoded at the training resolution into one uint8
array on disk, then memory-mapped by every later epoch, run, rank and DataLoader worker.

Without it every epoch decodes and resizes every image again with PIL (a CelebA JPEG: ~1-2 ms of CPU); with
it a batch is one gather from the array, as for the in-memory sets, and a set that fits can be moved to the
GPU whole (`--data.on_device`). CelebA at 64x64 is 202,599 x 3 x 64 x 64 bytes = 2.3 GiB.

Layout: `<cache_dir>/<dataset>-<R>px-<C>ch-n<N>-<digest>/images.npy` (N, C, R, R) uint8 and `labels.npy`
(N,) int64. The digest covers what the pixels depend on: the decoder version, resolution, channels, crop,
the number of images and the source files' sizes and modification times (image_folder: every file; celeba:
the image folder and split list; lsun: each database), so changing any of them builds a new cache. A cache is
written into a temporary folder and renamed into place: a killed build leaves no half-written cache, and
concurrent builders (DDP ranks, nodes on a shared file system) each finish or find the other's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gangen.cache_dir import creation_mode, not_a_folder, touch
from gangen.errors import ConfigError
from gangen.readers import TensorImageDataset

CACHE_ENV_VAR = "GANGEN_CACHE_DIR"  # gangen's cache root: decoded/ here, real_stats/ for the metrics
DECODER_VERSION = 3  # bump when readers.fit_image / to_mode change the pixels they produce (2: 16-bit grey
# scaled; 3: 16-bit grey PNGs that older Pillow opens as mode I scaled too)
_CHUNK = 256  # images per decode task (3 MiB at 64x64 RGB)
_source: Dataset | None = None  # the dataset decode workers read (inherited through fork, never pickled)


def cache_root(check: bool = True) -> Path:
    """$GANGEN_CACHE_DIR, else ~/.cache/gangen. `check`: a ConfigError when it is a file, or under one, so nothing
    could be cached there (commands resolve it before they write anything: fit's datamodule and metrics, evaluate)."""
    value = os.environ.get(CACHE_ENV_VAR)
    root = Path(value or Path.home() / ".cache" / "gangen").expanduser()
    blocker = not_a_folder(root) if check else None
    if blocker is not None:
        where = f"${CACHE_ENV_VAR} {value!r}" if value else f"gangen's cache folder {str(root)!r}"
        what = f": {blocker} is a file, so it cannot be made" if blocker != root.absolute() else " is a file"
        fix = "set it to a folder, or unset it for ~/.cache/gangen" if value else f"set ${CACHE_ENV_VAR} to a folder"
        raise ConfigError(f"{where}{what}: {fix} (gangen's cache of decoded datasets and real statistics)")
    return root


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_stats(paths: list[Path], relative_to: Path | None = None) -> list[list]:
    """[name, size, mtime_ns] of each path (name relative to `relative_to` when given; -1s when missing)."""
    prefix = os.path.join(str(relative_to), "") if relative_to else None  # "<root>/"
    stats = []
    for path in paths:
        name = full = str(path)
        if prefix is not None:  # what relative_to gives, without its cost per path where the prefix shows it
            name = full[len(prefix) :] if full.startswith(prefix) else str(path.relative_to(relative_to))
        try:
            st = os.stat(full)
        except OSError as e:  # missing as Path.exists sees it: no such file, a file as a folder, a link loop
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                raise
            stats.append([name, -1, -1])
        else:
            stats.append([name, st.st_size, st.st_mtime_ns])
    return stats


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of a key: a readable prefix and a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key["dataset"]))[-40:]
    name = f"{slug}-{key['resolution']}px-{key['channels']}ch-n{key['count']}-{digest}"
    return (Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "decoded") / name


def load(path: Path) -> TensorImageDataset:
    """A built cache as an in-memory style dataset whose images are memory-mapped (copy-on-write)."""
    images = np.load(path / "images.npy", mmap_mode="c")  # (N, C, R, R) uint8, pages read on demand
    touch(path)  # last used now (`gangen cache --clean --unused_days D`)
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(np.load(path / "labels.npy")))


def _decode(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Images start..stop-1 of the source: (n, C, R, R) uint8 and (n,) int64 labels."""
    assert _source is not None
    items = [_source[i] for i in range(*span)]
    return np.stack([image.numpy() for image, _ in items]), np.array([int(label) for _, label in items], np.int64)


def _decoded(spans: list[tuple[int, int]], processes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The decoded spans in order: in this process, or in `processes` forked workers."""
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():  # (Windows: no fork)
        yield from map(_decode, spans)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap(_decode, spans)


def build(source: Dataset, path: Path, processes: int = 1, log: bool = True) -> TensorImageDataset:
    """Decode every item of `source` ((C, R, R) uint8 image, label) into the cache folder `path`; returns it
    loaded. An item that fails to decode stops the build with its own error (readers: one line naming the file)
    and removes the partial files."""
    global _source
    count = len(source)
    first, _ = source[0]  # (C, R, R) uint8: the array's shape
    shape = (count, *first.shape)
    spans = [(i, min(i + _CHUNK, count)) for i in range(0, count, _CHUNK)]
    processes = max(1, min(processes, len(spans)))
    if log:
        gib = count * first.numel() / 2**30
        print(f"gangen: decoding {count} images once into {path} ({gib:.2f} GiB, {processes} processes)",
              flush=True)  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        try:
            images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
            if hasattr(os, "posix_fallocate"):  # reserve the blocks: a full disk fails here, not as a SIGBUS
                with open(tmp / "images.npy", "r+b") as f:  # when a page of the map is written mid-decode
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise _write_error(path, e) from e
        labels = np.empty(count, np.int64)
        _source = source
        for (start, stop), (chunk, chunk_labels) in zip(spans, _decoded(spans, processes), strict=True):
            images[start:stop], labels[start:stop] = chunk, chunk_labels  # decode errors propagate as they are
        images.flush()
        del images
        try:
            np.save(tmp / "labels.npy", labels)
            _sync(tmp / "images.npy", tmp / "labels.npy")  # on disk before the name says complete (power loss)
            tmp.chmod(creation_mode(0o777))  # mkdtemp's folder is private (0700): readable as any folder the user makes
            try:
                tmp.rename(path)  # atomic: the cache appears complete or not at all
            except OSError:
                if _complete(path, shape):  # another builder's cache is there now
                    return load(path)
                shutil.rmtree(path, ignore_errors=True)  # a folder left part-removed (by hand, or an older gangen)
                tmp.rename(path)
        except OSError as e:
            if not _complete(path, shape):
                raise _write_error(path, e) from e
    finally:
        _source = None
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; the partial files after an error
    return load(path)


def _sync(*files: Path) -> None:
    """fsync each file: its data reaches the disk before the folder is renamed into place."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _complete(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether the cache folder holds both of its files, whole, for images of `shape` (N, C, R, R): a file cut
    short (an interrupted copy, a crash on a file system that does not order the rename after the data) or of
    another shape is rebuilt, not memory-mapped (numpy: "mmap length is greater than file size") or indexed out
    of its bounds in the first batch."""
    return _npy_whole(path / "images.npy", shape, np.uint8) and _npy_whole(path / "labels.npy", shape[:1], np.int64)


def _npy_whole(file: Path, shape: tuple[int, ...], dtype: type) -> bool:
    """Whether `file` is a .npy array of this shape and dtype (C order) and holds all of its bytes."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return False
            size = f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
            return found == shape and found_dtype == dtype and not fortran and os.fstat(f.fileno()).st_size == size
    except (OSError, ValueError):  # missing, unreadable, or not a .npy file
        return False


def _write_error(path: Path, error: OSError) -> ConfigError:
    return ConfigError(
        f"cannot write the decoded dataset under {path.parent} ({error.strerror or error}): free space there or "
        "set --data.cache_dir to another folder ($GANGEN_CACHE_DIR), or --data.cache false"
    )


def cached(source: Dataset, key: dict, cache_dir: str | Path | None, processes: int) -> TensorImageDataset:
    """The decoded cache of `source` under `key`: loaded when it exists, built first when not."""
    path = cache_path(key, cache_dir)
    shape = (key["count"], key["channels"], key["resolution"], key["resolution"])
    if _complete(path, shape):
        return load(path)
    if path.exists():
        print(f"gangen: the decoded dataset {path} is damaged (a file is missing, cut short or of another shape): "
              "decoding it again", flush=True)  # fmt: skip
    return build(source, path, processes)

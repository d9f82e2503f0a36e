"""Reading images into uint8 tensors (C, H, W), and the Dataset classes ImageDataModule builds on.

- `read_idx`: IDX files (gzip or raw) as stored by (Fashion-)MNIST; `resize_images`: a whole uint8 tensor
  resized (bilinear, antialiased) and channel-converted at once, in chunks.
- `fit_image`, `to_mode`, `center_crop`: one PIL image -> (C, R, R) uint8 (EXIF orientation, L / RGB,
  shorter side to R, center crop); `scan_images`: an image folder's files and labels.
- `TensorImageDataset` (in memory, a batch is one gather: `__getitems__` -> `Batch`), `ImageFileDataset`,
  `LmdbImages` (LSUN) and `TorchvisionImages` (one PIL decode per item), and `collate`: uint8 batch -> float
  [-1, 1].
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from gangen.batches import to_unit_range_numpy
from gangen.errors import ConfigError, DataNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_CHUNK = 8192  # images per resize step, bounds temporary memory


class Batch(NamedTuple):
    """A batch as gathered by `__getitems__`, before float conversion."""

    images: Tensor  # (B, C, H, W) uint8
    labels: Tensor  # (B,) int64


def collate(batch: Batch | list[tuple[Tensor, int | Tensor]]) -> tuple[Tensor, Tensor]:
    """Turn a gathered Batch or a list of (uint8 image, label) items into float [-1, 1] images + labels."""
    if isinstance(batch, Batch):
        images, labels = batch
    else:
        images = torch.stack([item[0] for item in batch])  # (B, C, H, W) uint8
        labels = torch.as_tensor([int(item[1]) for item in batch])
    # numpy: this tiny per-batch work stays single-threaded; torch's thread pool took ~30 ms per batch
    # (vs 0.05 ms) when other processes kept the cores busy
    images = to_unit_range_numpy(images.numpy())  # 0 -> -1 and 255 -> 1 exactly
    return images, labels.long()


class FlipItems(Dataset):
    """A dataset addressed by (index, flip) keys (reliability.ResumableRandomSampler with hflip): the item,
    its image mirrored left-right where flip. The flips come with the order, so a resumed run repeats them."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, Any]:
        image, label = self.base[key[0]]
        return (image.flip(-1) if key[1] else image), label

    def __getitems__(self, keys: list[tuple[int, bool]]) -> Batch | list[tuple[Tensor, Any]]:
        if not hasattr(self.base, "__getitems__"):
            return [self[key] for key in keys]
        batch = self.base.__getitems__([index for index, _ in keys])
        if not isinstance(batch, Batch):  # a list of items: torch's Subset has __getitems__ whatever its base
            return [
                ((image.flip(-1) if f else image), label) for (image, label), (_, f) in zip(batch, keys, strict=True)
            ]
        flip = np.array([f for _, f in keys], dtype=bool).reshape(-1, 1, 1, 1)
        images = batch.images.numpy()  # (B, C, H, W) uint8
        return Batch(torch.from_numpy(np.where(flip, images[..., ::-1], images)), batch.labels)


class TensorImageDataset(Dataset):
    """In-memory images: indexing a batch of indices is a single tensor gather."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> Batch:
        index = np.asarray(indices, dtype=np.int64)  # numpy gather: single-threaded, see collate
        return Batch(torch.from_numpy(self.images.numpy()[index]), torch.from_numpy(self.labels.numpy()[index]))


def read_idx(path: Path) -> Tensor:
    """Read an IDX file (gzip or raw) of unsigned bytes into a uint8 tensor of its stored shape."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read IDX file {path} ({e}): delete it and reinstall or re-download") from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise ConfigError(
            f"{path} is not a uint8 IDX file (magic {data[:4].hex()}): point root at the "
            "original train-images-idx3-ubyte[.gz] files"
        )
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise ConfigError(
            f"IDX file {path} is truncated or corrupt ({len(data)} bytes for shape {shape}): "
            "delete it and reinstall or re-download"
        )
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy())


def resize_images(images: Tensor, resolution: int, channels: int) -> Tensor:
    """Resize (bilinear, antialiased) and convert channels (N, C, H, W) uint8 -> (N, channels, R, R) uint8."""
    out = []
    for chunk in images.split(_CHUNK):
        if chunk.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            chunk = (chunk.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        if chunk.shape[-2:] != (resolution, resolution):
            chunk = F.interpolate(
                chunk, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
            )
        if chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        out.append(chunk.contiguous())
    return torch.cat(out)  # (N, channels, R, R) uint8


def to_mode(image: Image.Image, channels: int, name: str = "an image") -> Image.Image:
    """Apply the EXIF orientation and convert to "L" (channels=1) or "RGB" (channels=3).

    16-bit grey images (PNG, TIFF: modes I;16*; a PNG in mode "I", as older Pillow opens them) are scaled to
    8 bits (65535 -> 255); PIL's convert clips them at 255 instead, which makes nearly every pixel white.
    32-bit and signed integer ("I", e.g. TIFFs written from numpy arrays; Pillow opens signed 16-bit TIFFs as "I"
    too) and float ("F") images have no fixed range to scale from, and convert would clip them too (nearly all
    white, or all black for floats in [0, 1]): they raise ConfigError naming `name`.
    """
    if image.mode in ("I", "F") and not (image.mode == "I" and image.format == "PNG"):  # PNG: at most 16 bits
        kind = "32-bit or signed integer" if image.mode == "I" else "floating-point"  # I;16S TIFFs open as I
        raise ConfigError(
            f"{name} has {kind} pixels (PIL mode {image.mode}), which have no fixed 8-bit scale: save it as an 8- or "
            "16-bit PNG"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.float32)  # (H, W) in the file's byte order, native now
        image = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L")
    return image.convert("L" if channels == 1 else "RGB")


def fit_image(image: Image.Image, resolution: int, crop: int | None = None) -> Tensor:
    """PIL image -> (C, R, R) uint8: optional center crop to `crop`, shorter side to R, center crop."""
    if crop is not None:
        image = center_crop(image, min(crop, image.width), min(crop, image.height))
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = center_crop(image.resize(size, Image.Resampling.BILINEAR), resolution, resolution)
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)  # (R, R, C)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, R, R) uint8


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The central width x height box of the image."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


class ImageFileDataset(Dataset):
    """Image files decoded with PIL one at a time; a file that fails to decode raises ConfigError."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int, channels: int) -> None:
        self.files, self.labels, self.resolution, self.channels = files, labels, resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.draft("L" if self.channels == 1 else "RGB", (self.resolution, self.resolution))
                image = to_mode(image, self.channels, f"image {path}")  # decodes the file
        except ConfigError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            raise ConfigError(
                f"cannot decode image {path} ({type(e).__name__}: {e}): delete or replace the file"
            ) from e
        return fit_image(image, self.resolution), self.labels[index]


class TorchvisionImages(Dataset):
    """Wrap a torchvision dataset of (PIL image, target) into (uint8 image, int label)."""

    def __init__(self, base: Dataset, resolution: int, channels: int, crop: int | None = None) -> None:
        self.base, self.resolution, self.channels, self.crop = base, resolution, channels, crop

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.base[index]
        label = target if isinstance(target, int) else 0
        return fit_image(to_mode(image, self.channels), self.resolution, self.crop), label


def _unreadable(root: Path, err: OSError) -> None:
    """os.walk's onerror: a folder it cannot list (permissions, a vanished mount) left its images out silently."""
    raise DataNotFoundError(
        f"cannot read folder {err.filename} under {root} ({err.strerror}): its images would be left out; make it "
        "readable (chmod), or move it out of --data.root"
    ) from None


def _closed_lost_found(folder: str, name: str) -> bool:
    """Whether folder/name is a lost+found this user cannot list (skipped by the scan, `_folders`)."""
    return name == "lost+found" and not os.access(os.path.join(folder, name), os.R_OK | os.X_OK)


def _folders(root: Path, skipped: list[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """(folder, non-hidden subfolder names, file names) of every folder under root, each real folder once.

    Links to folders are followed, but only after every real folder under root is read, and a folder read
    already (by (st_dev, st_ino)) is not read again: a link to an ancestor (`up -> ..`) or to a folder
    scanned through another path would otherwise repeat its images, under the wrong class. The links so
    skipped are appended to `skipped` (as given under root). A folder that cannot be listed (permissions)
    raises DataNotFoundError naming it: os.walk skipped it, and its images, silently. The exception is a
    `lost+found` the user cannot list, which is skipped like a hidden folder: an ext4 disk's root holds
    root's 0700 one, which a user can neither read nor move out of a mount point given as --data.root.
    """
    seen: set[tuple[int, int]] = set()
    pending = [str(root)]  # the root, then links to folders, in the order they are found
    while pending:
        for folder, dirs, names in os.walk(pending.pop(0), onerror=functools.partial(_unreadable, root)):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                skipped.append(folder)
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            # skip hidden (.git, .ipynb_checkpoints) and a lost+found this user cannot list
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _closed_lost_found(folder, d))
            pending += [os.path.join(folder, d) for d in dirs if os.path.islink(os.path.join(folder, d))]
            yield folder, dirs, names


def scan_images(root: Path, report: Callable[[str], None] | None = None) -> tuple[list[Path], list[int], int | None]:
    """Sorted image files under root (recursive), their labels and the number of classes (None if flat).

    The classes are the top-level subfolders that hold at least one image, sorted (images directly in root
    are class 0 when there are classes). Each real folder is read once (links to folders are followed,
    `_folders`). `report` gets one line naming the class folders without images (skipped: they are not
    classes) and one naming the links to folders read already (not read again).
    """
    found: list[tuple[tuple[str, ...], Path, str]] = []  # (sort key, file, top-level folder; "" for root)
    skipped: list[str] = []
    subfolders: list[str] = []  # root's own
    for folder, dirs, names in _folders(root, skipped):
        if not subfolders and folder == str(root):
            subfolders = list(dirs)
        keep = [n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        if keep:  # what needs a Path method is done once per folder: per file it cost seconds at CelebA's size
            base = Path(folder)
            parts = base.relative_to(root).parts
            order = tuple(os.path.normcase(p) for p in base.parts)  # Path's own order: part by part
            found += [((*order, os.path.normcase(n)), base / n, parts[0] if parts else "") for n in keep]
    if not found:
        raise DataNotFoundError(
            f"no images in {root} (searched recursively for {' '.join(IMAGE_EXTENSIONS)}, any case): "
            "pass --data.root DIR holding image files"
        )
    found.sort(key=lambda item: item[0])
    files, tops = [f for _, f, _ in found], [t for _, _, t in found]
    classes = sorted(set(tops))
    if report is not None and skipped:
        links = [str(Path(s).relative_to(root)) for s in skipped]
        report(
            f"gangen: skipped {len(links)} link(s) to folders under {root} read already (each folder is read "
            f"once): {', '.join(links[:5])}{', ...' if len(links) > 5 else ''}"
        )
    empty = [d for d in subfolders if d not in classes and str(Path(root, d)) not in skipped]
    if report is not None and empty and classes != [""]:
        report(
            f"gangen: class folders without images under {root} are skipped, not classes: {', '.join(empty)} "
            f"(labels 0..{len(classes) - 1} number the {len(classes)} that hold images)"
        )
    if classes == [""]:
        return files, [0] * len(files), None
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[t] for t in tops], len(classes)


class LmdbImages(Dataset):
    """LSUN's lmdb databases (one folder per class: key -> encoded image) as (uint8 image, class index), each
    database in key order, the classes one after another: the items torchvision's LSUN gives.

    Used instead of torchvision's LSUN, which pickles each key list into the working directory under a name
    made of the path's letters only (two roots that differ in digits share one, and a changed database keeps
    its stale list), and whose second instance on the same database (a val split that falls back to the train
    set) fails: lmdb opens an environment once per process. Here the keys are read once per instance into one
    bytes buffer (no Python object per key, so forked workers share the pages), nothing is written, and the
    handles are shared by every instance in a process and reopened after a fork.
    """

    def __init__(self, folders: list[Path], resolution: int, channels: int) -> None:
        self.folders, self.resolution, self.channels = list(folders), resolution, channels
        keys, ends, sizes = bytearray(), [], []
        for folder in self.folders:
            with lmdb_env(folder).begin() as txn:
                for key in txn.cursor().iternext(keys=True, values=False):
                    keys += key
                    ends.append(len(keys))
            sizes.append(len(ends) - sum(sizes))
        self._keys = bytes(keys)
        self._ends = np.asarray(ends, dtype=np.int64)  # key i is _keys[_ends[i - 1]:_ends[i]]
        self._labels = np.repeat(np.arange(len(sizes)), sizes)  # (N,) database index = class label

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = int(self._labels[index])
        key = self._keys[self._ends[index - 1] if index else 0 : self._ends[index]]
        with lmdb_env(self.folders[label]).begin() as txn:
            data = txn.get(key)
        try:
            if data is None:
                raise KeyError("no such key")
            with Image.open(io.BytesIO(data)) as image:
                image = to_mode(
                    image, self.channels, f"image {key.decode(errors='replace')!r} in {self.folders[label]}"
                )
        except ConfigError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad bytes
            raise ConfigError(
                f"cannot decode image {key.decode(errors='replace')!r} in {self.folders[label]} "
                f"({type(e).__name__}: {e}): rebuild that database or leave its class out of --data.lsun_classes"
            ) from e
        return fit_image(image, self.resolution), label


_lmdb_envs: dict[tuple[int, str], Any] = {}  # (pid, folder) -> read-only lmdb.Environment


def lmdb_env(folder: Path) -> Any:  # lmdb.Environment
    """This process's read-only handle on the lmdb database in `folder`, opened on first use."""
    import lmdb

    key = (os.getpid(), str(Path(folder).resolve()))
    if key not in _lmdb_envs:
        for inherited in [k for k in _lmdb_envs if k[0] != key[0]]:  # a forked child: lmdb must not reuse, and
            _lmdb_envs.pop(inherited).close()  # will not reopen, the parent's handles (closing them is local)
        try:
            _lmdb_envs[key] = lmdb.open(key[1], readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as e:
            raise DataNotFoundError(
                f"cannot open LSUN database {folder} ({e}): pass --data.root DIR holding <class>_train_lmdb folders"
            ) from e
    return _lmdb_envs[key]

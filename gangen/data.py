"""ImageDataModule: image batches in [-1, 1] for GAN training.

Every dataset yields uint8 images (C, H, W) already at `resolution` and `channels`; the loader's collate
function turns each batch into float32 (B, C, H, W) in [-1, 1] plus int64 labels (B,) (0 when unlabelled).

- fashion_mnist, mnist: IDX files (gzip or raw, gangen.readers), cifar10: torchvision's arrays. These small sets
  are held in memory as one uint8 tensor (N, C, H, W), resized and channel-converted once at setup; a batch
  is one tensor index (`__getitems__`), with no per-image work.
- celeba (torchvision), lsun (lmdb databases, readers.LmdbImages) and image_folder are decoded with PIL once,
  at setup, into a uint8 array on disk (gangen.decoded; `cache`, default "auto": when the decoded set is at
  most MAX_IN_MEMORY_GIB) and then served like the in-memory sets, memory-mapped; with cache false (or a
  larger set) every item is decoded with PIL when it is loaded (use num_workers).
- image_folder: recursive scan of `root` for IMAGE_EXTENSIONS (case-insensitive, hidden files and folders
  skipped), sorted by path; links to folders are followed, each real folder read once (a link to a folder
  read already is skipped, with one line saying so). Label = index among the sorted top-level subfolders
  that hold at least one image (images directly in `root` form class 0 when such subfolders exist); a
  top-level folder without images is not a class, and one line names those skipped. With no subfolders
  every label is 0 and num_classes is None. An image that fails to decode raises ConfigError naming the
  file (at setup when cached, else when it is loaded). Alpha is dropped (RGBA -> RGB / L); 16-bit grey is
  scaled to 8 bits; 32-bit or signed integer and float images (PIL modes I, F) raise ConfigError; JPEGs are decoded at
  reduced size (PIL draft) when much larger than R.
- Validation split: the test split where there is one (fashion_mnist, mnist, cifar10, celeba); LSUN's
  `<class>_val` databases when all are present; otherwise (image_folder, LSUN without val) the training set
  itself, which is what GAN metrics such as FID usually compare against.
- on_device (in-memory sets and decoded caches): training batches are built on the training device by
  gangen.batches.DeviceBatches instead of a DataLoader ("auto": on CUDA when the set fits).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, Subset

from gangen import decoded
from gangen.batches import ORDER_VERSION, DeviceBatches, fits_on_device
from gangen.cache_dir import not_a_folder
from gangen.errors import ConfigError, DataNotFoundError
from gangen.readers import (
    FlipItems,
    ImageFileDataset,
    LmdbImages,
    TensorImageDataset,
    TorchvisionImages,
    collate,
    read_idx,
    resize_images,
    scan_images,
)
from gangen.reliability import ResumableRandomSampler, check_same_world, sampler_state

_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"

DATASETS = ("fashion_mnist", "mnist", "cifar10", "celeba", "lsun", "image_folder")
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_DOWNLOAD_ROOT = "data"  # where download=True puts files when no root is given
LSUN_CATEGORIES = tuple(
    "bedroom bridge church_outdoor classroom conference_room dining_room kitchen living_room restaurant tower".split()
)
MAX_IN_MEMORY_GIB = 16  # refuse in-memory sets larger than this (resolution too high for the machine)
_IN_MEMORY_SIZES = {"fashion_mnist": (60000, 10000), "mnist": (60000, 10000), "cifar10": (50000, 10000)}
_FILE_DATASETS = ("celeba", "lsun", "image_folder")  # PIL decodes: cached once (gangen.decoded) or per item
_CELEBA_CROP = 178  # the central 178 x 178 face box of CelebA's aligned 178 x 218 images
_IDX_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision's <root>/<name>/raw
_IDX_FILES = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
_DOWNLOADABLE = ("fashion_mnist", "mnist", "cifar10", "celeba")  # torchvision can fetch these


def evenly_spaced(total: int, limit: int | None) -> list[int] | None:
    """`limit` indices spread evenly over range(total), in order; None when limit keeps everything."""
    if limit is None or limit >= total:
        return None
    return [i * total // limit for i in range(limit)]


def _is_int(value: object, low: int) -> bool:
    """Whether value is an int (not a bool) >= low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class ImageDataModule(pl.LightningDataModule):
    """Train / validation image batches: float32 (B, C, R, R) in [-1, 1] and int64 labels (B,)."""

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        resolution: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = False,
        lsun_classes: list[str] | None = None,
        limit: int | None = None,
        on_device: bool | Literal["auto"] = "auto",
        hflip: bool = False,
        seed: int = 0,
        cache: bool | Literal["auto"] = "auto",
        cache_dir: str | None = None,
    ) -> None:
        """Build and validate the config; files are read in setup (in memory) or per item.

        Args:
            dataset: fashion_mnist, mnist, cifar10, celeba, lsun or image_folder (DATASETS).
            root: data folder; None = /usr/share/datasets/fashion-mnist for fashion_mnist, ./data to download.
            resolution: output side length, a power of two in [8, 1024].
            channels: 1 (grey) or 3 (RGB); images are converted as needed.
            batch_size: images per batch (per device under DDP).
            num_workers: DataLoader worker processes (0 = load in the main process).
            download: fetch the dataset with torchvision in prepare_data (needs network).
            lsun_classes: LSUN categories to train on (default ["bedroom"]).
            limit: use at most this many images per split, evenly spaced over it (items 0, n/limit,
                2n/limit, ...: a class-sorted set keeps every class's share); for tests and quick runs.
            on_device: build training batches on the training device from one uint8 tensor (in-memory sets:
                fashion_mnist, mnist, cifar10, and decoded caches); "auto": on CUDA when the set fits in 1/4
                of free memory. true with celeba / lsun / image_folder decodes them once (cache).
            hflip: flip training images left-right with probability 1/2.
            seed: the training order: the epoch's shuffle and flips depend on (seed, epoch) only, on either data
                path (on-device batches or the DataLoader), so a resume may take the other one.
            cache: celeba / lsun / image_folder: decode every image once into a uint8 array on disk and train
                from it; "auto": when the decoded set is at most MAX_IN_MEMORY_GIB; false: PIL per item.
            cache_dir: where decoded sets go; None = $GANGEN_CACHE_DIR/decoded or ~/.cache/gangen/decoded.
        """
        super().__init__()
        # `seed` stays out of the hparams: Lightning refuses a run whose model and datamodule hparams share a
        # key with different values, and GAN has its own `seed` (config.yaml and checkpoints still hold it)
        self.save_hyperparameters(ignore=["seed"])
        name = str(dataset).lower().replace("-", "_")
        if name not in DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
        if not _is_int(resolution, 8) or resolution > 1024 or resolution & (resolution - 1):
            raise ConfigError(
                f"resolution {resolution!r} is not a power of two in [8, 1024]: "
                "use 8, 16, 32, 64, 128, 256, 512 or 1024"
            )
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(f"channels {channels!r} is not supported: use 1 (grey) or 3 (RGB)")
        for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("limit", limit, 1)):
            if not _is_int(value, low) and not (key == "limit" and value is None):
                raise ConfigError(f"{key} {value!r} is invalid: use an integer >= {low}")
        if download and name not in _DOWNLOADABLE:
            raise ConfigError(
                f"dataset {name} cannot be downloaded by torchvision: set --data.download false and pass "
                "--data.root DIR holding the files"
            )
        self.dataset, self.resolution, self.channels = name, resolution, channels
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.download = download
        if on_device not in (True, False, "auto"):
            raise ConfigError(f"on_device {on_device!r} is invalid: use auto, true or false")
        if cache not in (True, False, "auto"):
            raise ConfigError(f"cache {cache!r} is invalid: use auto, true or false")
        if on_device is True and name in _FILE_DATASETS:
            if cache is False:
                raise ConfigError(
                    f"on_device true needs {name} decoded once: drop --data.cache false, or set --data.on_device false"
                )
            cache = True  # on the device means one uint8 tensor: decode once, whatever its size
        if not isinstance(hflip, bool) or not isinstance(download, bool):
            bad = ("hflip", hflip) if not isinstance(hflip, bool) else ("download", download)
            raise ConfigError(f"{bad[0]} {bad[1]!r} is invalid: use true or false")
        if not _is_int(seed, 0):
            raise ConfigError(f"seed {seed!r} is invalid: use an integer >= 0")
        if isinstance(lsun_classes, str) or not all(isinstance(c, str) for c in lsun_classes or []):
            raise ConfigError(f"lsun_classes {lsun_classes!r} is invalid: use a list of names, e.g. ['bedroom']")
        self.on_device, self.hflip, self.seed = on_device, hflip, seed
        self.cache, self.cache_dir = cache, cache_dir
        if name in _FILE_DATASETS and cache is not False:  # a file in the way: said now, not at setup after the
            if cache_dir is None:  # run folder is written
                decoded.cache_root()  # $GANGEN_CACHE_DIR
            elif (blocker := not_a_folder(cache_dir)) is not None:
                itself = blocker == Path(cache_dir).expanduser().absolute()
                what = "is a file" if itself else f"is under the file {blocker}"
                fix = "pass a folder for the decoded images, or --data.cache false"
                raise ConfigError(f"--data.cache_dir {cache_dir!r} {what}: {fix}")
        self.lsun_classes = list(lsun_classes or ["bedroom"])
        self.root = self._resolve_root(root)
        self._num_classes: int | None = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10}.get(name)
        self._splits: dict[str, Dataset] = {}
        self._folder_stats: list[list] | None = None  # image_folder: the files' [name, size, mtime] (cache key)
        self._sampler_seed: int | None = None  # training order seed (restored from checkpoints)
        self._order_version = ORDER_VERSION  # how the restored checkpoint's order was drawn (batches.py)
        self._resume: dict | None = None  # {"epoch", "position"} from a checkpoint taken mid-epoch
        self._train_sampler: ResumableRandomSampler | DeviceBatches | None = None  # what state_dict reads
        self._check_files()

    def _resolve_root(self, root: str | None) -> Path:
        """The data folder: the given root (must exist unless downloading) or the dataset's default."""
        if root is not None:
            path = Path(root).expanduser()
            hint = " or set --data.download true" if self.dataset in _DOWNLOADABLE else ""
            if self.dataset == "fashion_mnist":
                hint = f", run `apt-get install dataset-fashion-mnist` (files in {DEFAULT_FASHION_MNIST_ROOT}){hint}"
            if path.exists() and not path.is_dir():
                raise ConfigError(
                    f"data root {root} is a file, not a folder: pass --data.root DIR, the folder that holds the "
                    f"{self.dataset} files (e.g. {path.parent})"
                )
            if not path.is_dir() and not self.download:
                raise DataNotFoundError(
                    f"data root {root} does not exist: pass --data.root DIR with the {self.dataset} files{hint}"
                )
            return path
        if self.dataset == "fashion_mnist" and (not self.download or Path(DEFAULT_FASHION_MNIST_ROOT).is_dir()):
            return Path(DEFAULT_FASHION_MNIST_ROOT)
        if self.download:
            return Path(DEFAULT_DOWNLOAD_ROOT)
        hint = " or set --data.download true on a machine with network" if self.dataset in _DOWNLOADABLE else ""
        raise ConfigError(f"dataset {self.dataset} has no default root: pass --data.root DIR{hint}")

    def _check_files(self) -> None:
        """Fail before training when files, packages or memory are clearly missing."""
        if self.dataset in _IN_MEMORY_SIZES:
            n = sum(min(s, self.limit or s) for s in _IN_MEMORY_SIZES[self.dataset])
            gib = n * self.channels * self.resolution**2 / 2**30
            if gib > MAX_IN_MEMORY_GIB:
                raise ConfigError(
                    f"resolution {self.resolution} needs {gib:.0f} GiB to hold {self.dataset} in memory "
                    f"(> {MAX_IN_MEMORY_GIB}): use a lower resolution or set --data.limit"
                )
        if self.dataset in _IDX_FOLDERS and not self.download:
            self._idx_paths()
        elif self.dataset == "image_folder":
            self._files, self._labels, self._num_classes = scan_images(self.root, report=rank_zero_info)
            keep = evenly_spaced(len(self._files), self.limit)  # the classes stay as scanned: labels keep meaning
            if keep is not None:
                self._files, self._labels = [self._files[i] for i in keep], [self._labels[i] for i in keep]
        elif self.dataset == "lsun":
            if importlib.util.find_spec("lmdb") is None:
                raise ConfigError("dataset lsun needs the lmdb package: pip install lmdb")
            bad = [c for c in self.lsun_classes if c not in LSUN_CATEGORIES]
            if bad:
                raise ConfigError(f"unknown LSUN classes {bad}: choose from {', '.join(LSUN_CATEGORIES)}")
            self._num_classes = len(self.lsun_classes)
            for c in self.lsun_classes:
                if not (self.root / f"{c}_train_lmdb").is_dir():
                    raise DataNotFoundError(
                        f"LSUN database {self.root / f'{c}_train_lmdb'} not found: pass "
                        "--data.root DIR holding <class>_train_lmdb folders"
                    )
        elif not self.download:
            folder = {"cifar10": "cifar-10-batches-py", "celeba": "celeba"}[self.dataset]
            if not (self.root / folder).is_dir():
                raise DataNotFoundError(
                    f"{self.dataset} not found: {self.root / folder} does not exist; pass --data.root DIR "
                    f"holding {folder}/ or set --data.download true"
                )

    def _idx_paths(self, required: bool = True) -> list[Path] | None:
        """The four IDX files (train images, labels, test images, labels), raw or .gz; None if missing."""
        folders = [self.root, self.root / "raw", self.root / _IDX_FOLDERS[self.dataset] / "raw"]
        for folder in folders:
            found = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in _IDX_FILES]
            if all(found):
                return found
        if not required:
            return None
        fashion = self.dataset == "fashion_mnist"
        install = "install it with `apt-get install dataset-fashion-mnist`, " if fashion else ""
        raise DataNotFoundError(
            f"{'Fashion-MNIST' if fashion else 'MNIST'} not found in {self.root} (nor its raw/ or "
            f"{_IDX_FOLDERS[self.dataset]}/raw/): {install}pass --data.root DIR holding "
            "train-images-idx3-ubyte[.gz] and the other 3 IDX files, or set --data.download true on a "
            "machine with network"
        )

    def _idx_split(self, split: str) -> list[Path]:
        """A split's IDX (images, labels) files."""
        return self._idx_paths()[:2] if split == "train" else self._idx_paths()[2:]

    @property
    def num_classes(self) -> int | None:
        """Number of label classes, or None when the dataset is unlabelled."""
        return self._num_classes

    def prepare_data(self) -> None:
        """Download with torchvision when download=True (needs network), then decode a file dataset once when
        it is cached. Lightning runs this in one process per node, before every process's setup."""
        if self.download:
            self._download()
        if self.dataset in _FILE_DATASETS and self.cache is not False:
            for split in ("train", "val"):
                self._split(split)

    def _download(self) -> None:
        from torchvision import datasets

        root = str(self.root)
        try:
            if self.dataset in _IDX_FOLDERS:
                cls = datasets.FashionMNIST if self.dataset == "fashion_mnist" else datasets.MNIST
                if self._idx_paths(required=False) is None:
                    for train in (True, False):
                        cls(root, train=train, download=True)
            elif self.dataset == "cifar10":
                datasets.CIFAR10(root, train=True, download=True)
            elif self.dataset == "celeba":
                datasets.CelebA(root, split="all", target_type=[], download=True)
        except (OSError, RuntimeError) as e:
            raise DataNotFoundError(
                f"download of {self.dataset} into {root} failed ({e}): check the network "
                "or pass --data.root DIR holding the files"
            ) from e

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs (the small datasets into memory)."""
        for split in ("train", "val") if stage in (None, "fit") else ("val",):
            self._split(split)

    def _split(self, split: str) -> Dataset:
        if split not in self._splits:
            data = self._build(split)
            keep = evenly_spaced(len(data), self.limit)  # in-memory and folder sets are cut already
            if keep is not None:
                data = Subset(data, keep)
            if self._decode_once(len(data)):
                key = self._cache_key(split, len(data), cut=keep is not None)
                data = decoded.cached(data, key, self.cache_dir, processes=decoded.usable_cpus())
            elif self.dataset in _FILE_DATASETS and self.cache == "auto":  # too large for auto: say what it costs
                gib = len(data) * self.channels * self.resolution**2 / 2**30
                folder = self.cache_dir or decoded.cache_root() / "decoded"
                rank_zero_info(
                    f"gangen: the {self.dataset} {split} split would take {gib:.1f} GiB decoded (auto caches up to "
                    f"{MAX_IN_MEMORY_GIB:g} GiB): every image is decoded with PIL when loaded, in --data.num_workers "
                    f"{self.num_workers}; --data.cache true decodes it once into {folder} (that much disk)"
                )
            self._splits[split] = data
        return self._splits[split]

    def _decode_once(self, count: int) -> bool:
        """Whether this (file) dataset of `count` images is decoded once into a cache (see `cache`)."""
        if self.dataset not in _FILE_DATASETS or self.cache is False:
            return False
        return self.cache is True or count * self.channels * self.resolution**2 <= MAX_IN_MEMORY_GIB * 2**30

    def source_stats(self, split: str) -> list:
        """[name, size, mtime_ns] of the files a split is read from, which its decoded cache (celeba, lsun,
        image_folder) and real-image statistics depend on."""
        if self.dataset in _IDX_FOLDERS:
            return decoded.file_stats(self._idx_split(split))
        if self.dataset == "cifar10":
            names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            return decoded.file_stats([self.root / "cifar-10-batches-py" / name for name in names])
        if self.dataset == "image_folder":  # the val split is the training set: one stat pass
            if self._folder_stats is None:
                self._folder_stats = decoded.file_stats(self._files, self.root)
            return self._folder_stats
        if self.dataset == "celeba":
            folder = self.root / "celeba"
            return [split, *decoded.file_stats([folder / "img_align_celeba", folder / "list_eval_partition.txt"])]
        return decoded.file_stats([self.root / f"{name}_lmdb" / "data.mdb" for name in self._lsun_names(split)])

    def _cache_key(self, split: str, count: int, cut: bool = False) -> dict:
        """What the decoded pixels of a split depend on (gangen.decoded): settings and source file stats, and
        whether `limit` cut an evenly spaced subset from the dataset (first-N caches of older versions differ); for
        image_folder, the labels."""
        key = {
            "dataset": self.dataset, "root": str(self.root.resolve()), "source": self.source_stats(split),
            "count": count, "resolution": self.resolution, "channels": self.channels,
            "crop": _CELEBA_CROP if self.dataset == "celeba" else None, "decoder": decoded.DECODER_VERSION,
        }  # fmt: skip
        if cut:  # only then, so the keys of uncut caches stay as they were
            key["subset"] = "evenly spaced"
        if self.dataset == "image_folder":  # numbered over every class folder, also those a limit leaves out
            key["labels"] = self._labels
        return key

    def _lsun_names(self, split: str) -> list[str]:
        """The LSUN databases of a split: <class>_val when all exist, else <class>_train."""
        names = [f"{c}_{'train' if split == 'train' else 'val'}" for c in self.lsun_classes]
        if not all((self.root / f"{c}_lmdb").is_dir() for c in names):
            names = [f"{c}_train" for c in self.lsun_classes]  # no val databases: use the train set
        return names

    def _build(self, split: str) -> Dataset:
        """Create the dataset of one split ("train" or "val")."""
        train, n = split == "train", self.limit
        if self.dataset in _IDX_FOLDERS:
            paths = self._idx_split(split)
            images = read_idx(paths[0]).unsqueeze(1)  # (N, 1, 28, 28) uint8
            labels = read_idx(paths[1]).long()  # (N,)
            if len(images) != len(labels) or images.dim() != 4:
                raise ConfigError(
                    f"{paths[0]} and {paths[1]} do not match (shapes {tuple(images.shape)}, "
                    f"{tuple(labels.shape)}): reinstall or re-download the dataset"
                )
            keep = evenly_spaced(len(images), n)
            if keep is not None:
                images, labels = images[keep], labels[keep]
            return TensorImageDataset(resize_images(images, self.resolution, self.channels), labels)
        if self.dataset == "image_folder":
            return ImageFileDataset(self._files, self._labels, self.resolution, self.channels)  # cut at scan
        if self.dataset == "lsun":
            folders = [self.root / f"{name}_lmdb" for name in self._lsun_names(split)]
            return LmdbImages(folders, self.resolution, self.channels)
        from torchvision import datasets

        try:
            if self.dataset == "cifar10":
                base = datasets.CIFAR10(str(self.root), train=train)
                keep = evenly_spaced(len(base.data), n)
                keep = slice(None) if keep is None else keep
                images = torch.from_numpy(base.data[keep]).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
                labels = torch.as_tensor(base.targets, dtype=torch.long)[keep]
                return TensorImageDataset(resize_images(images, self.resolution, self.channels), labels)
            if self.dataset == "celeba":
                base = datasets.CelebA(str(self.root), split="train" if train else "test", target_type=[])
                return TorchvisionImages(base, self.resolution, self.channels, crop=_CELEBA_CROP)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
            raise DataNotFoundError(
                f"{self.dataset} files in {self.root} are missing or corrupt ({e}): pass "
                "--data.root DIR or set --data.download true"
            ) from e

    def check_train_size(self, world_size: int, val_check_interval: int | float | None = None) -> None:
        """Refuse, before anything is read or written, a training split too small for one batch per process,
        and a --trainer.val_check_interval (a batch count) longer than an epoch, where the split's size is
        known without loading it (the in-memory datasets, a scanned image folder); the others are checked
        when their batches are built."""
        if self.dataset in _IN_MEMORY_SIZES:
            count = min(_IN_MEMORY_SIZES[self.dataset][0], self.limit or _IN_MEMORY_SIZES[self.dataset][0])
        elif self.dataset == "image_folder":
            count = len(self._files)  # cut to the limit at the scan
        else:
            return
        self._check_batches("train", count, world_size)
        batches = count // world_size // self.batch_size  # per process and epoch (drop_last)
        if isinstance(val_check_interval, int) and not isinstance(val_check_interval, bool):
            if val_check_interval > batches:  # Lightning: a ValueError traceback once training starts
                raise ConfigError(
                    f"--trainer.val_check_interval {val_check_interval} is more than the {batches} training batches "
                    f"of an epoch: use at most {batches}, a fraction of an epoch (0.5), or add "
                    "--trainer.check_val_every_n_epoch null to count batches across epochs"
                )

    def _check_batches(self, split: str, count: int, world_size: int) -> None:
        """Each of `world_size` processes gets count // world_size items: at least one full batch each."""
        if count // world_size < self.batch_size:  # drop_last would leave no batch at all
            processes = f" x {world_size} processes" if world_size > 1 else ""
            err = ConfigError(
                f"the {self.dataset} {split} split has {count} images, fewer than batch_size {self.batch_size}"
                f"{processes}: lower --data.batch_size or add images"
            )
            err.on_every_rank = world_size > 1  # every rank counts the same: the CLI prints it once
            raise err

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._split(split)
        sampler = None
        seed = 0
        if shuffle:  # an order fixed by (seed, epoch) that a resumed run can enter mid-epoch (reliability.py)
            rank, world_size = self._rank_world()
            self._check_batches(split, len(dataset), world_size)
            seed = self.order_seed  # the on-device batches' too: either path may resume the other's checkpoint
            sampler = ResumableRandomSampler(len(dataset), seed, rank, world_size, hflip=self.hflip)
            if self.hflip:
                dataset = FlipItems(dataset)  # indexed by the sampler's (index, flip) keys
            if self._resume is not None:
                sampler.resume_at(self._resume["epoch"], self._resume["position"])
            self._train_sampler = sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,  # batches come pre-gathered or as items
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # the workers' base seed from an own generator: without one each new iterator (every epoch, every
            # validation) draws it from torch's global stream, which dropout uses, so a resume would not be exact
            generator=torch.Generator().manual_seed(seed),
        )

    def state_dict(self) -> dict:
        """The training order's seed and position, so `fit --ckpt_path` continues with the same batches."""
        if self._train_sampler is None:
            return {}
        return sampler_state(self.trainer, self._train_sampler, self.batch_size)

    def load_state_dict(self, state: dict) -> None:
        self._sampler_seed = state.get("seed", self._sampler_seed)
        self._resume = state if "position" in state else None
        self._order_version = state.get("order", 1) if state else ORDER_VERSION  # 1: saved before there was one

    @property
    def order_seed(self) -> int:
        """The training order's seed: a resumed checkpoint's, else --data.seed (both data paths)."""
        return self._sampler_seed if self._sampler_seed is not None else self.seed

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled training batches, incomplete last batch dropped; built on the device when on_device."""
        # Lightning warns of "unreliable results" at every mid-epoch resume of a loader without state_dict
        # methods; these batches resume exactly from the checkpoint's sampler state (README Reliability)
        warnings.filterwarnings("ignore", message=_NOT_RESUMABLE, category=PossibleUserWarning)
        trainer = self.trainer
        if self._resume is not None and trainer is not None:
            check_same_world(self._resume, trainer.world_size)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        on_device = self.use_on_device(device)
        if self.on_device == "auto" and trainer is not None and trainer.world_size > 1:  # free memory is per GPU:
            on_device = trainer.strategy.reduce_boolean_decision(on_device, all=True)  # one data path for all ranks
        if not on_device:
            return self._loader("train", shuffle=True)
        return self.device_batches(device, *self._rank_world())

    def _rank_world(self) -> tuple[int, int]:
        """(this process's rank, number of training processes); (0, 1) without a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def use_on_device(self, device: torch.device) -> bool:
        """Whether training batches are built on `device` (on_device true, or auto on CUDA when it fits)."""
        if self.on_device != "auto":
            return bool(self.on_device)
        data = self._split("train")
        return isinstance(data, TensorImageDataset) and fits_on_device(data.images.nbytes, device)

    def device_batches(self, device: torch.device | str, rank: int = 0, world_size: int = 1) -> DeviceBatches:
        """The training set as DeviceBatches on `device` (the uint8 images are moved there once)."""
        data = self._split("train")
        self._check_batches("train", len(data), world_size)
        batches = DeviceBatches(
            data.images, data.labels, self.batch_size, device=device, seed=self.order_seed, rank=rank,
            world_size=world_size, hflip=self.hflip, legacy_order=self._order_version < ORDER_VERSION,
        )  # fmt: skip
        if self._resume is not None and self.trainer is not None:  # per-rank positions: exact under DDP too
            batches.resume_at(self._resume["epoch"], self._resume["position"])
        self._train_sampler = batches
        return batches

    def val_dataloader(self) -> DataLoader:
        """Held-out batches in fixed order (the test split where the dataset has one)."""
        return self._loader("val", shuffle=False)

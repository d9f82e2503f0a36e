"""Tests of gangen.data: real Fashion-MNIST, IDX files, image folders, torchvision wrappers, bad input."""

import gzip
import hashlib
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import assert_fit_refused, file_server
from PIL import Image
from torchvision import datasets

from gangen import data
from gangen.data import DEFAULT_FASHION_MNIST_ROOT, ImageDataModule
from gangen.errors import ConfigError, DataNotFoundError
from gangen.readers import collate, read_idx, resize_images

FMNIST = Path(DEFAULT_FASHION_MNIST_ROOT)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def first_batch(dm: ImageDataModule, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def check_batch(images: torch.Tensor, labels: torch.Tensor, n: int, channels: int, resolution: int) -> None:
    assert images.shape == (n, channels, resolution, resolution) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian dims, data."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def fmnist_arrays() -> dict[str, np.ndarray]:
    """A few real Fashion-MNIST images and labels per IDX file: 20 train, 10 test."""
    assert (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(), "apt-get install dataset-fashion-mnist (.ci/run does)"
    test_images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz").numpy()
    test_labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").numpy()
    arrays = (test_images[:20], test_labels[:20], test_images[20:30], test_labels[20:30])
    return dict(zip(IDX_NAMES, arrays, strict=True))


def write_idx(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


# ---------------------------------------------------------------- real Fashion-MNIST
def test_fashion_mnist_full_splits() -> None:
    dm = ImageDataModule(batch_size=128)
    dm.setup("fit")
    assert dm.root == FMNIST and dm.num_classes == 10
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train.dataset) == 60000 and len(val.dataset) == 10000
    assert len(train) == 60000 // 128 and len(val) == -(-10000 // 128)  # drop_last only for train
    check_batch(*first_batch(dm), 128, 1, 32)
    images, labels = collate(val.dataset.__getitems__(list(range(10000))))  # whole val split at once
    assert images.min() == -1.0 and images.max() == 1.0  # 0 and 255 map exactly onto the ends
    assert labels.unique().tolist() == list(range(10))
    assert train.dataset.labels.bincount().tolist() == [6000] * 10


@pytest.mark.parametrize("resolution, channels", [(16, 1), (64, 1), (32, 3), (8, 3)])
def test_fashion_mnist_variants(resolution: int, channels: int) -> None:
    dm = ImageDataModule(resolution=resolution, channels=channels, batch_size=32, limit=100)
    images, labels = first_batch(dm)
    check_batch(images, labels, 32, channels, resolution)
    assert len(dm.train_dataloader().dataset) == 100 and len(dm.val_dataloader().dataset) == 100
    if channels == 3:  # grey replicated into RGB
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_val_order_fixed_and_train_shuffled() -> None:
    dm = ImageDataModule(batch_size=16, limit=64)
    assert torch.equal(first_batch(dm, "val")[0], first_batch(dm, "val")[0])
    assert torch.equal(first_batch(dm, "val")[1], dm._split("val").labels[:16])
    torch.manual_seed(0)
    a = first_batch(dm)[1]
    torch.manual_seed(1)
    assert torch.equal(a, first_batch(dm)[1])  # --data.seed's order (as on the device), not torch's global seed
    assert not torch.equal(a, dm._split("train").labels[:16])  # shuffled
    assert not torch.equal(a, first_batch(ImageDataModule(batch_size=16, limit=64, seed=1))[1])


def test_getitems_matches_getitem_and_workers() -> None:
    dm = ImageDataModule(batch_size=8, limit=64, num_workers=1)
    dataset = dm._split("train")
    index = [5, 0, 63, 17]
    by_batch = collate(dataset.__getitems__(index))
    by_item = collate([dataset[i] for i in index])
    assert all(torch.equal(a, b) for a, b in zip(by_batch, by_item, strict=True))
    images, labels = first_batch(dm)  # through a worker process
    check_batch(images, labels, 8, 1, 32)


def test_resize_matches_pil() -> None:
    """Antialiased bilinear resize and RGB -> grey agree with PIL within one grey level."""
    images = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)
    for resolution, channels in ((16, 3), (64, 3), (16, 1)):
        ours = resize_images(images, resolution, channels)
        mode = "L" if channels == 1 else "RGB"
        pil = [
            np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).convert(mode).resize((resolution,) * 2, 2))
            for x in images
        ]
        ref = torch.from_numpy(np.stack(pil)).reshape(6, resolution, resolution, channels).permute(0, 3, 1, 2)
        assert ours.shape == ref.shape and (ours.int() - ref.int()).abs().max() <= 1


def test_lightning_fit_uses_datamodule(tmp_path: Path) -> None:
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(32 * 32, 10)
            self.seen: list[tuple[int, ...]] = []

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.seen.append(tuple(images.shape))
            return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

        def validation_step(self, batch, batch_idx):
            self.seen.append(tuple(batch[0].shape))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model, dm = Tiny(), ImageDataModule(batch_size=16, limit=64)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert set(model.seen) == {(16, 1, 32, 32)}
    assert dict(dm.hparams)["limit"] == 64 and dict(dm.hparams)["dataset"] == "fashion_mnist"


# ---------------------------------------------------------------- IDX files
@pytest.mark.parametrize("subfolder", ["", "raw", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_in_any_layout(tmp_path: Path, fmnist_arrays: dict, subfolder: str, gz: bool) -> None:
    write_idx(tmp_path / subfolder, fmnist_arrays, gz=gz)
    dm = ImageDataModule(root=str(tmp_path), resolution=32, batch_size=4)
    dm.setup("fit")
    train, val = dm._split("train"), dm._split("val")
    assert len(train) == 20 and len(val) == 10
    assert train.labels.tolist() == fmnist_arrays["train-labels-idx1-ubyte"].tolist()
    expected = resize_images(torch.from_numpy(fmnist_arrays["t10k-images-idx3-ubyte"]).unsqueeze(1), 32, 1)
    assert torch.equal(val.images, expected)
    check_batch(*first_batch(dm), 4, 1, 32)


def test_mnist_reads_its_torchvision_layout(tmp_path: Path, fmnist_arrays: dict) -> None:
    write_idx(tmp_path / "MNIST" / "raw", fmnist_arrays)
    dm = ImageDataModule(dataset="mnist", root=str(tmp_path), resolution=16, channels=3, batch_size=5)
    check_batch(*first_batch(dm), 5, 3, 16)
    with pytest.raises(DataNotFoundError, match="MNIST not found"):  # fashion_mnist ignores MNIST/raw
        ImageDataModule(dataset="fashion_mnist", root=str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_the_file(tmp_path: Path, fmnist_arrays: dict, gz: bool) -> None:
    write_idx(tmp_path, fmnist_arrays, gz=gz)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[:-100])
    dm = ImageDataModule(root=str(tmp_path))
    with pytest.raises(ConfigError) as error:
        dm.setup("fit")
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">i", 2049 + 0x0D00) + b"\0" * 8)  # float IDX, not uint8
    with pytest.raises(ConfigError, match="not a uint8 IDX file"):
        read_idx(path)


def test_download_runs_torchvision_into_its_layout(tmp_path: Path, monkeypatch) -> None:
    """download=True runs torchvision's own FashionMNIST download in prepare_data (fetch, md5 check, gunzip)
    and then reads <root>/FashionMNIST/raw. No network here: torchvision's mirror is a loopback server of
    Debian's files, and its md5s are those files' (Debian's gzip differs from the upstream archive)."""
    files = {p.name: p for p in sorted(Path(DEFAULT_FASHION_MNIST_ROOT).glob("*-ubyte.gz"))}
    assert len(files) == 4
    md5s = [(name, hashlib.md5(path.read_bytes()).hexdigest()) for name, path in files.items()]
    with file_server(files) as (url, requests):
        monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [url + "/"])
        monkeypatch.setattr(datasets.FashionMNIST, "resources", md5s)
        dm = ImageDataModule(root=str(tmp_path / "new"), download=True, batch_size=4, limit=64)
        dm.prepare_data()
        first = list(requests)  # torchvision reads each file's start once to follow redirects, then fetches it
        dm.prepare_data()  # files present now: no second download
        assert requests == first
    assert sorted({r.lstrip("/") for r in first}) == sorted(files)
    raw = tmp_path / "new" / "FashionMNIST" / "raw"
    for name, path in files.items():  # torchvision kept the archive and unpacked it
        assert (raw / name).read_bytes() == path.read_bytes()
        assert (raw / name.removesuffix(".gz")).read_bytes() == gzip.decompress(path.read_bytes())
    check_batch(*first_batch(dm), 4, 1, 32)
    assert torch.equal(dm._split("train")[0][0], ImageDataModule(limit=64)._split("train")[0][0])


# ---------------------------------------------------------------- image folders
def make_folder(root: Path, tree: dict[str, tuple[str, tuple[int, int]]]) -> Path:
    """Write images {relative path: (PIL mode, (width, height))} cut from a smooth gradient picture."""
    for i, (name, (mode, size)) in enumerate(sorted(tree.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = np.add.outer(np.arange(size[1]), np.arange(size[0])) * 4 + i * 10
        rgb = np.stack([grid, grid * 2, 255 - grid], -1).clip(0, 255).astype(np.uint8)  # (H, W, 3)
        image = Image.fromarray(rgb).convert(mode)
        image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None)
    return root


TREE = {
    "bags/a.png": ("L", (28, 28)),
    "bags/deep/er/b.JPG": ("RGB", (50, 70)),
    "bags/c.webp": ("RGB", (64, 64)),
    "coats/d.png": ("RGBA", (40, 30)),
    "coats/e.bmp": ("RGB", (9, 200)),
    "coats/f.gif": ("P", (33, 33)),
    "coats/g.tiff": ("RGB", (100, 100)),
    "shoes/h.jpeg": ("L", (300, 120)),
}


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_nested(tmp_path: Path, channels: int) -> None:
    root = make_folder(tmp_path / "imgs", TREE)
    (root / "coats" / "notes.txt").write_text("not an image")
    make_folder(root / ".cache", {"hidden.png": ("L", (8, 8))})
    dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=16, channels=channels, batch_size=8)
    assert dm.num_classes == 3
    train = dm.train_dataloader()
    assert len(train.dataset) == 8 and len(dm.val_dataloader().dataset) == 8  # val = the whole folder
    images, labels = next(iter(dm.val_dataloader()))  # sorted order: bags, coats, shoes
    check_batch(images, labels, 8, channels, 16)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert images.std() > 0.1  # real content, not a blank canvas


def test_image_folder_flat_and_root_files(tmp_path: Path) -> None:
    flat = make_folder(tmp_path / "flat", {"x.png": ("RGB", (20, 20)), "y.jpg": ("L", (40, 24))})
    dm = ImageDataModule(dataset="image_folder", root=str(flat), resolution=8, channels=3, batch_size=2)
    assert dm.num_classes is None and first_batch(dm, "val")[1].tolist() == [0, 0]
    mixed = make_folder(tmp_path / "mixed", {"top.png": ("L", (9, 9)), "sub/z.png": ("L", (9, 9))})
    dm = ImageDataModule(dataset="image_folder", root=str(mixed), resolution=8, batch_size=2, limit=2)
    assert dm.num_classes == 2 and first_batch(dm, "val")[1].tolist() == [1, 0]  # sub/z.png sorts first


def test_image_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataNotFoundError) as error:
        ImageDataModule(dataset="image_folder", root=str(tmp_path / "empty"))
    message = str(error.value)
    assert str(tmp_path / "empty") in message and ".png" in message and ".tiff" in message


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_image_folder_corrupt_file_raises_at_load(tmp_path: Path, content: str) -> None:
    root = make_folder(tmp_path / "imgs", {"a.png": ("RGB", (20, 20)), "b.jpg": ("RGB", (64, 64))})
    bad = root / "b.jpg"
    bad.write_bytes(b"not an image at all" if content == "garbage" else bad.read_bytes()[:300])
    dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=8, batch_size=2, cache=False)
    dataset = dm._split("train")
    assert len(dataset) == 2 and dataset[0][0].shape == (1, 8, 8)  # uncached: setup does not decode; a.png loads
    with pytest.raises(ConfigError) as error:
        dataset[1]
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- torchvision-backed datasets (faked)
def test_cifar10_in_memory(tmp_path: Path, monkeypatch) -> None:
    class FakeCIFAR10:
        def __init__(self, root: str, train: bool) -> None:
            n = 12 if train else 6
            self.data = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
            self.targets = list(range(n))

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    dm = ImageDataModule(dataset="cifar10", root=str(tmp_path), channels=3, resolution=32, batch_size=4)
    dm.setup("fit")
    assert len(dm._split("train")) == 12 and len(dm._split("val")) == 6
    fake = FakeCIFAR10("", True)
    assert torch.equal(dm._split("train").images, torch.from_numpy(fake.data).permute(0, 3, 1, 2))
    check_batch(*first_batch(dm), 4, 3, 32)


@pytest.mark.parametrize("cache", [False, "auto"])
def test_celeba_per_item_crop(tmp_path: Path, monkeypatch, cache) -> None:
    class FakeCelebA(torch.utils.data.Dataset):
        def __init__(self, root: str, split: str, target_type: list) -> None:
            self.split = split

        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            image = np.zeros((218, 178, 3), np.uint8)
            image[20:198] = 255  # white 178 x 178 centre, black bands that the crop removes
            return Image.fromarray(image), None

    (tmp_path / "celeba").mkdir()
    monkeypatch.setattr(datasets, "CelebA", FakeCelebA)
    dm = ImageDataModule(dataset="celeba", root=str(tmp_path), channels=3, resolution=16, batch_size=5, limit=5,
                         cache=cache, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    images, labels = first_batch(dm)
    check_batch(images, labels, 5, 3, 16)
    assert images.min() == 1.0 and labels.tolist() == [0] * 5 and dm.num_classes is None
    if cache is False:
        assert dm._split("val").base.split == "test"
    else:  # decoded once per split: the train and test splits are different caches
        dm._split("val")
        assert len(list((tmp_path / "cache").iterdir())) == 2


def test_missing_torchvision_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()  # folder present, files missing
    dm = ImageDataModule(dataset="cifar10", root=str(tmp_path), channels=3)
    with pytest.raises(DataNotFoundError) as error:
        dm.setup("fit")
    assert str(tmp_path) in str(error.value) and "--data.download true" in str(error.value)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- bad input
BAD = [
    (dict(dataset="imagenet"), ConfigError, ["imagenet", "fashion_mnist, mnist, cifar10"]),
    (dict(resolution=48), ConfigError, ["48", "power of two"]),
    (dict(resolution=4), ConfigError, ["resolution 4 "]),
    (dict(resolution=2048), ConfigError, ["2048"]),
    (dict(resolution=32.0), ConfigError, ["32.0"]),
    (dict(channels=2), ConfigError, ["channels 2", "use 1 (grey) or 3 (RGB)"]),
    (dict(batch_size=0), ConfigError, ["batch_size 0"]),
    (dict(num_workers=-1), ConfigError, ["num_workers -1"]),
    (dict(limit=0), ConfigError, ["limit 0"]),
    (dict(root="/no/such/dir"), DataNotFoundError, ["/no/such/dir", "--data.root"]),
    (dict(dataset="mnist"), ConfigError, ["mnist", "--data.root", "--data.download true"]),
    (dict(dataset="image_folder"), ConfigError, ["image_folder", "--data.root"]),
    (dict(dataset="image_folder", root="/no/such/pics"), DataNotFoundError, ["/no/such/pics"]),
    (dict(dataset="cifar10", root="/tmp"), DataNotFoundError, ["/tmp/cifar-10-batches-py", "--data.download"]),
    (dict(dataset="celeba", root="/tmp"), DataNotFoundError, ["/tmp/celeba"]),
    (dict(dataset="lsun", root="/tmp", download=True), ConfigError, ["lsun", "--data.download false"]),
    (dict(dataset="fashion_mnist", root="/tmp"), DataNotFoundError, ["/tmp", "apt-get install"]),
    (dict(resolution=1024, channels=3), ConfigError, ["1024", "GiB", "--data.limit"]),
]


@pytest.mark.parametrize("kwargs, error, parts", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_config_fails_in_init_with_one_line(kwargs: dict, error: type, parts: list[str]) -> None:
    with pytest.raises(error) as caught:
        ImageDataModule(**kwargs)
    message = str(caught.value)
    assert all(p in message for p in parts), message
    assert "\n" not in message


def test_lsun_errors(tmp_path: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(data.importlib.util, "find_spec", lambda name: None)  # as without lmdb
        with pytest.raises(ConfigError, match="pip install lmdb"):
            ImageDataModule(dataset="lsun", root=str(tmp_path))
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: object())  # as with lmdb
    with pytest.raises(ConfigError, match="'kitchens'"):
        ImageDataModule(dataset="lsun", root=str(tmp_path), lsun_classes=["kitchens"])
    with pytest.raises(DataNotFoundError) as error:
        ImageDataModule(dataset="lsun", root=str(tmp_path), lsun_classes=["bedroom", "tower"])
    assert str(tmp_path / "bedroom_train_lmdb") in str(error.value) and "\n" not in str(error.value)


def test_hparams_are_plain_values() -> None:
    dm = ImageDataModule(lsun_classes=["bedroom"], limit=10)
    plain = (str, int, bool, type(None), list)
    assert dm.hparams and all(isinstance(v, plain) for v in dm.hparams.values())


def test_split_smaller_than_a_batch_is_refused() -> None:
    dm = ImageDataModule(limit=100, batch_size=128)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="has 100 images, fewer than batch_size 128"):
        dm.train_dataloader()


@pytest.mark.parametrize("extra", [["--trainer.devices", "2", "--data.limit", "96"],
                                   ["--data.limit", "100", "--data.batch_size", "128"]])  # fmt: skip
def test_split_too_small_for_every_process_is_refused_before_anything_is_written(capsys, tmp_path, extra) -> None:
    """Under DDP each rank gets len // world_size images: 96 images, batch 64 and 2 processes leave no rank a
    full batch, which Lightning only warns about (then trains on nothing). It was refused only once training
    began: once per rank, after the run folder, config.yaml and hparams.yaml were written."""
    world = "x 2 processes" if "2" in extra else "batch_size 128:"
    assert_fit_refused(capsys, tmp_path, ["--trainer.accelerator", "cpu", *extra], ["train split has", world])


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert clips 16-bit grey (mode I;16) at 255: a full-range ramp came out nearly white."""
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in steps of 257
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(ramp).save(root / "ramp.png")
    assert Image.open(root / "ramp.png").mode == "I;16"
    for channels, cache in ((1, False), (3, False), (1, True)):  # PIL per item, and the decoded cache
        dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=16, channels=channels,
                             batch_size=1, cache=cache, cache_dir=str(tmp_path / "cache"))  # fmt: skip
        dm.setup("fit")
        image, _ = dm._split("train")[0]  # (C, 16, 16) uint8
        assert torch.equal(image, torch.arange(256).view(1, 16, 16).expand(channels, -1, -1).to(torch.uint8))


def test_limit_is_evenly_spaced_so_every_class_keeps_its_share(tmp_path: Path) -> None:
    tree = {f"{c}/{i}.png": ("L", (12, 12)) for c in ("a_bags", "b_coats", "c_shoes") for i in range(8)}
    root = make_folder(tmp_path / "sorted", tree)  # sorted by class, as a scan returns it
    for cache in (True, False):
        dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=8, batch_size=6, limit=6,
                             cache=cache, cache_dir=str(tmp_path / "cache"))  # fmt: skip
        assert dm.num_classes == 3 and [p.name for p in dm._files] == ["0.png", "4.png"] * 3
        assert first_batch(dm, "val")[1].tolist() == [0, 0, 1, 1, 2, 2]  # the first 6 would all be bags
    dm = ImageDataModule(batch_size=16, limit=100)
    dm.setup("fit")
    train_labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    assert torch.equal(dm._split("train").labels, train_labels[::600].long())  # 60000 / 100
    assert torch.equal(dm._split("val").labels, read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[::100].long())

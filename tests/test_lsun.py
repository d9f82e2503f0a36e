"""LSUN from real lmdb databases in LSUN's layout (<class>_<split>_lmdb, key -> JPEG / WebP bytes)."""

from __future__ import annotations

import gc
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_fit_args
from PIL import Image

from gangen import decoded, readers
from gangen.data import ImageDataModule
from gangen.errors import ConfigError
from gangen.readers import LmdbImages, TorchvisionImages, collate

lmdb = pytest.importorskip("lmdb")  # in the dev extra, so CI runs these

SIZES = {"bedroom": 9, "tower": 6}  # training images per class; val databases hold 3 each


def write_db(folder: Path, images: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in images.items():
            txn.put(key, value)
    env.close()


def encoded(rng: np.random.Generator, i: int) -> bytes:
    """An RGB image of a varying size (wider or taller than square), as JPEG or WebP bytes."""
    array = rng.integers(0, 256, (30 + 3 * i, 44 - 2 * i, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="WEBP" if i % 2 else "JPEG")
    return buffer.getvalue()


@pytest.fixture
def lsun_root(tmp_path: Path) -> Path:
    """Train and val databases of two classes; keys written out of order (lmdb keeps them sorted)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "lsun"
    root.mkdir()
    for c, n in SIZES.items():
        for split, count in (("train", n), ("val", 3)):
            order = list(range(count))[::-1]
            write_db(root / f"{c}_{split}_lmdb", {f"{c}-{split}-{i:03d}".encode(): encoded(rng, i) for i in order})
    return root


def module(root: Path, cache_dir: Path, **kw) -> ImageDataModule:
    return ImageDataModule(dataset="lsun", root=str(root), lsun_classes=list(SIZES), resolution=16, channels=3,
                           batch_size=3, cache_dir=str(cache_dir), **kw)  # fmt: skip


def items(dataset) -> tuple[torch.Tensor, list[int]]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), [int(p[1]) for p in pairs]


def close_handles() -> None:
    """Close this process's shared lmdb handles (lmdb refuses to open an environment twice in one process)."""
    for env in readers._lmdb_envs.values():
        env.close()
    readers._lmdb_envs.clear()


def test_same_items_as_torchvision_and_nothing_written(lsun_root, tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.chdir(tmp_path)  # torchvision pickles key lists into the working directory
    close_handles()
    base = datasets.LSUN(str(lsun_root), classes=[f"{c}_train" for c in SIZES])
    reference = items(TorchvisionImages(base, 16, 3))
    for db in base.dbs:
        db.env.close()
    del base
    gc.collect()

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ours = module(lsun_root, tmp_path / "c", cache=False)._split("train")
    assert isinstance(ours, LmdbImages) and len(ours) == sum(SIZES.values())
    images, labels = items(ours)
    assert torch.equal(images, reference[0]) and labels == reference[1]  # pixels, labels and order
    assert labels == [0] * SIZES["bedroom"] + [1] * SIZES["tower"]
    assert list(work.iterdir()) == []  # no key-list files in the working directory


def test_val_databases_and_the_fallback_to_train(lsun_root, tmp_path):
    dm = module(lsun_root, tmp_path / "c", cache=False)
    assert len(dm._split("val")) == 6 and items(dm._split("val"))[1] == [0, 0, 0, 1, 1, 1]
    for path in (lsun_root / "tower_val_lmdb").iterdir():
        path.unlink()
    (lsun_root / "tower_val_lmdb").rmdir()
    dm = module(lsun_root, tmp_path / "c", cache=False)  # one val database missing: both splits read train
    train, val = dm._split("train"), dm._split("val")  # the same databases open twice in one process
    assert len(val) == len(train) == sum(SIZES.values())
    assert torch.equal(items(val)[0], items(train)[0])
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and labels.tolist() == [0, 0, 0]


def test_decoded_once_equals_per_item_reads_in_worker_processes(lsun_root, tmp_path, monkeypatch):
    per_item = module(lsun_root, tmp_path / "c", cache=False, num_workers=2)
    images, labels = [], []
    for batch_images, batch_labels in torch.utils.data.DataLoader(per_item._split("train"), batch_size=4,
                                                                    num_workers=2):  # fmt: skip
        images.append(batch_images)
        labels += batch_labels.tolist()
    monkeypatch.setattr(decoded, "_CHUNK", 4)  # 4 spans over 2 forked processes
    cached = decoded.build(per_item._split("train"), tmp_path / "two", processes=2, log=False)
    assert torch.equal(cached.images, torch.cat(images)) and cached.labels.tolist() == labels
    dm = module(lsun_root, tmp_path / "c")  # the default: decoded once through the data module
    dm.prepare_data()
    assert torch.equal(dm._split("train").images, cached.images)
    [name, _] = sorted(p.name for p in (tmp_path / "c").iterdir())  # train and val caches
    assert name.startswith("lsun-16px-3ch-n15-")


def test_undecodable_entry_is_one_line_naming_key_and_database(lsun_root, tmp_path):
    folder = lsun_root / "tower_train_lmdb"
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"tower-train-002", b"not an image")
    env.close()
    close_handles()
    dm = module(lsun_root, tmp_path / "c")
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "'tower-train-002'" in message and str(folder) in message and "\n" not in message
    assert not (tmp_path / "c").exists() or os.listdir(tmp_path / "c") == []


def test_cli_fit_on_lsun(lsun_root, tmp_path):
    args = tiny_fit_args(tmp_path / "runs", "--trainer.max_epochs", "1", "--data.dataset", "lsun",
                         "--data.root", str(lsun_root), "--data.lsun_classes", "[bedroom, tower]",
                         "--data.batch_size", "5", "--data.limit", "15",
                         "--data.cache_dir", str(tmp_path / "c"))  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gangen: decoding 15 images once" in r.stdout + r.stderr
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_limit_spreads_over_the_classes_with_and_without_the_cache(lsun_root, tmp_path):
    full = items(module(lsun_root, tmp_path / "c", cache=False)._split("train"))
    keep = [0, 3, 6, 9, 12]  # 5 of bedroom's 9 + tower's 6: the first 5 would all be bedrooms
    for cache in (False, True):
        images, labels = items(module(lsun_root, tmp_path / "c", cache=cache, limit=5)._split("train"))
        assert labels == [0, 0, 0, 1, 1] and torch.equal(images, full[0][keep])
    assert any("-n5-" in p.name for p in (tmp_path / "c").iterdir())


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_split_too_small_for_every_process_is_one_line_from_two_processes(lsun_root, tmp_path, on_device):
    """LSUN's size is known only once its databases are read: the refusal comes when the batches are built,
    on every rank, and is printed once (it was printed by each process)."""
    args = tiny_fit_args(tmp_path / "runs", "--trainer.max_epochs", "1", "--data.dataset", "lsun",
                         "--data.root", str(lsun_root), "--data.lsun_classes", "[bedroom, tower]",
                         "--data.batch_size", "8", "--data.limit", "15", "--data.on_device", on_device,
                         "--data.cache_dir", str(tmp_path / "c"), "--trainer.devices", "2",
                         "--trainer.accelerator", "cpu")  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("gangen: error:")]
    assert errors == ["gangen: error: the lsun train split has 15 images, fewer than batch_size 8 x 2 processes: "
                      "lower --data.batch_size or add images"]  # fmt: skip


def test_limit_with_hflip_and_no_cache_flips_the_items_torch_subset_gives(lsun_root, tmp_path):
    """--data.limit wraps the per-item dataset in torch's Subset, whose __getitems__ gives a list of items when
    the dataset under it has none: FlipItems took that list for a Batch (AttributeError at the first batch)."""
    dm = module(lsun_root, tmp_path / "c", cache=False, limit=6, hflip=True, on_device=False)
    torch.manual_seed(0)  # the loader's order seed: its first batch flips two of its three images
    loader = dm.train_dataloader()
    images, labels = next(iter(loader))
    keys = list(loader.sampler)[:3]  # (index, flip): the first batch's
    data = dm._split("train")
    expected = collate([(data[i][0].flip(-1) if flip else data[i][0], data[i][1]) for i, flip in keys])
    assert [flip for _, flip in keys] == [True, True, False]
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])

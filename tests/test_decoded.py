"""Decode once (gangen.decoded): file datasets decoded into a uint8 cache, the same pixels as per-item decoding,
built once, rebuilt when a source file changes, never left half-written; DDP builds it in one process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, tiny_fit_args
from PIL import Image
from test_data import TREE, make_folder

from gangen import data, decoded
from gangen.batches import DeviceBatches
from gangen.data import ImageDataModule
from gangen.errors import ConfigError
from gangen.readers import ImageFileDataset, TensorImageDataset, scan_images


def folder_module(root: Path, cache_dir: Path, **kw) -> ImageDataModule:
    return ImageDataModule(dataset="image_folder", root=str(root), resolution=16, channels=3, batch_size=2,
                           cache_dir=str(cache_dir), **kw)  # fmt: skip


def caches(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_cache_holds_the_per_item_pixels_and_is_built_once(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", TREE)
    per_item = folder_module(root, tmp_path / "c", cache=False)._split("train")
    assert isinstance(per_item, ImageFileDataset)
    dm = folder_module(root, tmp_path / "c")
    dm.prepare_data()  # builds (Lightning: one process per node)
    assert "gangen: decoding 8 images once into" in capsys.readouterr().out
    [name] = caches(tmp_path / "c")
    assert name.startswith("image_folder-16px-3ch-n8-")
    cached = dm._split("train")
    assert isinstance(cached, TensorImageDataset) and cached.images.shape == (8, 3, 16, 16)
    for i in range(len(per_item)):  # the same pixels and labels as decoding each file
        image, label = per_item[i]
        assert torch.equal(cached.images[i], image) and int(cached.labels[i]) == label
    assert dm.num_classes == 3 and dm._split("val").images.shape == (8, 3, 16, 16)  # val: the same files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c" / name).stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    images_file = tmp_path / "c" / name / "images.npy"
    stamp = images_file.stat().st_mtime_ns
    again = folder_module(root, tmp_path / "c")
    again.prepare_data()
    again.setup("fit")
    assert capsys.readouterr().out == "" and images_file.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert torch.equal(again._split("train").images, cached.images)
    images, labels = next(iter(again.train_dataloader()))  # (2, 3, 16, 16) in [-1, 1]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and -1 <= images.min() <= images.max() <= 1


@pytest.mark.parametrize("lost", ["labels.npy", "images.npy"])
def test_cache_folder_missing_a_file_is_rebuilt_in_place(tmp_path, lost):
    """A cache folder with one of its files gone (removed by hand, or an interrupted removal before `gangen
    cache --clean` renamed entries first) used to be decoded again on every run and then fail at the rename."""
    root = make_folder(tmp_path / "imgs", TREE)
    first = folder_module(root, tmp_path / "c")
    first.prepare_data()
    want = first._split("train")
    [name] = caches(tmp_path / "c")
    (tmp_path / "c" / name / lost).unlink()
    again = folder_module(root, tmp_path / "c")
    again.prepare_data()
    assert caches(tmp_path / "c") == [name]  # rebuilt under its own name, no temporary folder left
    got = again._split("train")
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


def test_changed_file_or_settings_build_a_new_cache(tmp_path):
    root = make_folder(tmp_path / "imgs", TREE)
    folder_module(root, tmp_path / "c").prepare_data()
    before = caches(tmp_path / "c")
    png = root / "bags" / "a.png"
    Image.new("L", (28, 28), color=7).save(png)  # same name, new pixels
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    dm = folder_module(root, tmp_path / "c")
    dm.prepare_data()
    assert len(caches(tmp_path / "c")) == 2 and before[0] in caches(tmp_path / "c")
    index = [p.name for p in dm._files].index("a.png")
    assert int(dm._split("train").images[index].float().mean().round()) == 7  # the new pixels
    folder_module(root, tmp_path / "c", limit=3).prepare_data()  # fewer images: another key
    assert len(caches(tmp_path / "c")) == 3 and any("-n3-" in name for name in caches(tmp_path / "c"))


def test_worker_processes_decode_the_same_array(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", TREE)
    source = folder_module(root, tmp_path / "x", cache=False)._split("train")
    monkeypatch.setattr(decoded, "_CHUNK", 2)  # 3 spans, so the pool really splits the work
    one = decoded.build(source, tmp_path / "one", processes=1, log=False)
    two = decoded.build(source, tmp_path / "two", processes=2, log=False)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one", "two"]  # no temporary folders left


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_undecodable_file_stops_the_build_and_leaves_nothing(tmp_path, content):
    root = make_folder(tmp_path / "imgs", {"a.png": ("RGB", (20, 20)), "b.jpg": ("RGB", (64, 64))})
    bad = root / "b.jpg"
    bad.write_bytes(b"not an image at all" if content == "garbage" else bad.read_bytes()[:300])
    dm = folder_module(root, tmp_path / "c")
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    assert str(bad) in str(error.value) and "delete or replace" in str(error.value)
    assert "\n" not in str(error.value)
    assert caches(tmp_path / "c") == []  # neither a cache nor its temporary folder


def test_auto_caches_up_to_the_size_limit(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "imgs", TREE)
    assert isinstance(folder_module(root, tmp_path / "c")._split("train"), TensorImageDataset)
    monkeypatch.setattr(data, "MAX_IN_MEMORY_GIB", 8 * 3 * 16 * 16 / 2**30 * 0.99)  # just below 8 images
    dm = folder_module(root, tmp_path / "d")
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert isinstance(dm._split("train"), ImageFileDataset) and caches(tmp_path / "d") == []
    said = [r.getMessage() for r in caplog.records if "decoded" in r.getMessage()]
    assert len(said) == 2 and "--data.cache true" in said[0] and str(tmp_path / "d") in said[0]  # train, val
    assert isinstance(folder_module(root, tmp_path / "e", cache=True)._split("train"), TensorImageDataset)


def test_on_device_decodes_a_file_dataset_once(tmp_path):
    root = make_folder(tmp_path / "imgs", TREE)
    dm = folder_module(root, tmp_path / "c", on_device=True)
    dm.setup("fit")
    batches = dm.device_batches("cpu")
    assert isinstance(batches, DeviceBatches) and len(batches) == 4
    images, labels = next(iter(batches))
    assert images.shape == (2, 3, 16, 16) and labels.shape == (2,)
    with pytest.raises(ConfigError) as error:
        folder_module(root, tmp_path / "c", on_device=True, cache=False)
    assert "on_device true needs image_folder decoded once" in str(error.value)
    assert "--data.cache false" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="cache 'yes' is invalid"):
        folder_module(root, tmp_path / "c", cache="yes")


def test_two_process_fit_builds_the_cache_once(tmp_path):
    """DDP (2 CPU processes): prepare_data decodes in one process, both ranks train from the same cache."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(64):
        path = root / f"class{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(path)
    cache = tmp_path / "cache"
    args = tiny_fit_args(tmp_path / "runs", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                         "--trainer.max_epochs", "1", "--data.dataset", "image_folder", "--data.root", str(root),
                         "--data.batch_size", "8", "--data.cache_dir", str(cache), "--data.limit", "64")  # fmt: skip
    r = run_cli(*args, env={"PYTHONPATH": str(ROOT / "tests")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("gangen: decoding 64 images once") == 1
    [name] = caches(cache)
    assert name.startswith("image_folder-32px-1ch-n64-")
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_unwritable_cache_dir_is_one_line(tmp_path):
    root = make_folder(tmp_path / "imgs", TREE)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ConfigError) as error:
        folder_module(root, tmp_path / "file" / "cache").prepare_data()
    message = str(error.value)
    assert str(tmp_path / "file" / "cache") in message and "--data.cache_dir" in message and "\n" not in message


def test_file_stats_and_scan_order_as_pathlib_gives_them(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {**TREE, "a-b/x.png": ("L", (8, 8)), "a/y.png": ("L", (8, 8))})
    files, _, _ = scan_images(root)
    assert files == sorted(files) and files.index(root / "a" / "y.png") < files.index(root / "a-b" / "x.png")
    missing = root / "bags" / "gone.png"
    expected = [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    expected.append(["bags/gone.png", -1, -1])
    assert decoded.file_stats([*files, missing], root) == expected
    monkeypatch.chdir(tmp_path)  # a relative root, "imgs" or "./imgs": the same names
    for relative in (Path("imgs"), Path("./imgs")):
        found, _, _ = scan_images(relative)
        assert decoded.file_stats([*found, relative / "bags" / "gone.png"], relative) == expected

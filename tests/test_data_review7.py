"""Image folder scans (links to folders, empty class folders), image modes without an 8-bit scale, and the
decode cache's key and files (review 7 of the data path)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_folder
from test_decoded import caches, folder_module

from gangen import decoded
from gangen.data import ImageDataModule
from gangen.errors import ConfigError


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("gangen: ")]


def test_links_to_folders_are_followed_and_each_folder_read_once(tmp_path, caplog):
    """A link to an ancestor (`up -> ..`) was followed to the kernel's 40-link limit: every image 41 times,
    40 of the copies under the wrong class."""
    root = make_folder(tmp_path / "imgs", {f"{c}/{c[0]}.png": ("RGB", (12, 12)) for c in ("cats", "dogs", "fish")})
    make_folder(tmp_path / "elsewhere", {"birds/b.png": ("RGB", (12, 12))})
    (root / "cats" / "up").symlink_to("..")  # a loop
    (root / "dogs" / "same").symlink_to("../fish")  # fish, a second time
    (root / "birds").symlink_to(tmp_path / "elsewhere" / "birds")  # a folder outside root: read
    with caplog.at_level(logging.INFO):
        dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=8, batch_size=1, cache=False)
    assert [str(f.relative_to(root)) for f in dm._files] == ["birds/b.png", "cats/c.png", "dogs/d.png", "fish/f.png"]
    assert dm._labels == [0, 1, 2, 3] and dm.num_classes == 4
    assert said(caplog) == [
        f"gangen: skipped 2 link(s) to folders under {root} read already (each folder is read once): cats/up, dogs/same"
    ]


def test_empty_class_folder_is_named_and_not_a_class(tmp_path, caplog):
    """An empty class folder was dropped without a word, renumbering the classes after it; the docstring said
    every top-level subfolder was a class."""
    root = make_folder(tmp_path / "imgs", {"0_airplane/a.png": ("L", (8, 8)), "2_cat/c.png": ("L", (8, 8))})
    (root / "1_bird").mkdir()
    (root / "1_bird" / "notes.txt").write_text("no images yet")
    (root / ".cache").mkdir()  # hidden: not a class folder, not named
    with caplog.at_level(logging.INFO):
        dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=8, batch_size=1, cache=False)
    assert dm._labels == [0, 1] and dm.num_classes == 2
    assert said(caplog) == [
        f"gangen: class folders without images under {root} are skipped, not classes: 1_bird "
        "(labels 0..1 number the 2 that hold images)"
    ]


@pytest.mark.parametrize("cache", [False, True])
def test_32_bit_integer_and_float_images_are_refused_with_one_line(tmp_path, monkeypatch, cache):
    """PIL's convert clipped them: a 32-bit integer TIFF of 16-bit values came out nearly all white, a float
    TIFF in [0, 1] all black."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16)
    root = make_folder(tmp_path / "imgs", {"a.png": ("L", (16, 16))})
    Image.fromarray(ramp.astype(np.int32)).save(root / "b.tif")
    Image.fromarray((ramp / 65535).astype(np.float32)).save(root / "c.tif")
    Image.fromarray(ramp.astype(np.uint16)).save(root / "d.tif", tiffinfo={339: 2})  # SampleFormat 2: signed
    assert [Image.open(root / n).mode for n in ("b.tif", "c.tif", "d.tif")] == ["I", "F", "I"]
    monkeypatch.setattr(decoded, "_CHUNK", 1)  # cached: one image per task, decoded in 2 worker processes
    dm = folder_module(root, tmp_path / "cache", cache=cache)
    if cache:
        with pytest.raises(ConfigError) as error:
            dm.prepare_data()
        assert str(root / "b.tif") in str(error.value) and caches(tmp_path / "cache") == []  # no half-written cache
        return
    dataset = dm._split("train")
    assert dataset[0][0].shape == (3, 16, 16)
    cases = (
        (1, "b.tif", "I", "32-bit or signed integer"),
        (2, "c.tif", "F", "floating-point"),
        (3, "d.tif", "I", "32-bit or signed integer"),
    )
    for index, name, mode, kind in cases:
        with pytest.raises(ConfigError) as error:
            dataset[index]
        assert str(error.value) == (
            f"image {root / name} has {kind} pixels (PIL mode {mode}), which have no fixed 8-bit scale: save it as "
            "an 8- or 16-bit PNG"
        )


@pytest.mark.parametrize("damage", ["images.npy cut short", "labels.npy too short"])
def test_damaged_cache_folder_is_decoded_again(tmp_path, capsys, damage):
    """A truncated images.npy gave numpy's "mmap length is greater than file size" at setup, and a labels.npy of
    the wrong length an IndexError in the first batch, neither naming the cache."""
    root = make_folder(tmp_path / "imgs", {f"{c}/{i}.png": ("RGB", (20, 20)) for c in "ab" for i in range(4)})
    built = folder_module(root, tmp_path / "c")._split("train")
    want = built.images.clone(), built.labels.clone()  # not the memory map of the file cut below (SIGBUS)
    [name] = caches(tmp_path / "c")
    folder = tmp_path / "c" / name
    if damage == "images.npy cut short":
        os.truncate(folder / "images.npy", (folder / "images.npy").stat().st_size // 2)
    else:
        np.save(folder / "labels.npy", np.zeros(7, np.int64))
    capsys.readouterr()
    dm = folder_module(root, tmp_path / "c")
    got = dm._split("train")
    assert f"gangen: the decoded dataset {folder} is damaged" in capsys.readouterr().out
    assert caches(tmp_path / "c") == [name]  # rebuilt in place
    assert torch.equal(got.images, want[0]) and torch.equal(got.labels, want[1])
    assert len(next(iter(dm.train_dataloader()))[1]) == 2


def test_limited_cache_follows_the_labels_when_class_folders_are_added(tmp_path):
    """With --data.limit, class folders added between two runs can leave the kept files (and so the cache key)
    as they were while their labels change: the old labels.npy was loaded."""

    def add(classes: str) -> None:
        make_folder(root, {f"{c}/{i}.png": ("RGB", (8, 8)) for c in classes.split() for i in range(4)})
        for file in root.rglob("*.png"):
            os.utime(file, ns=(10**18, 10**18))  # the same stats however fast the test runs

    root = tmp_path / "imgs"
    add("b c")
    dm = folder_module(root, tmp_path / "c", limit=2)
    assert [str(f.relative_to(root)) for f in dm._files] == ["b/0.png", "c/0.png"]
    assert dm._split("train").labels.tolist() == [0, 1]
    add("bb d")  # bb sorts between b and c; the limit keeps b/0.png and c/0.png
    dm = folder_module(root, tmp_path / "c", limit=2)
    assert [str(f.relative_to(root)) for f in dm._files] == ["b/0.png", "c/0.png"] and dm.num_classes == 4
    assert dm._split("train").labels.tolist() == [0, 2]


def as_nobody(call) -> str:
    """call() run in a forked child that drops to the unprivileged user nobody (root reads any folder); what it
    returned, or the line of what it raised, comes back as a string."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                message = str(call())
            except Exception as err:  # the line the user would see
                message = f"{type(err).__name__}: {err}"
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_a_class_folder_that_cannot_be_read_is_named_not_left_out(tmp_path):
    """os.walk skipped a folder it could not list (no read permission): its class and images were left out
    without a word. Run as an unprivileged user (root reads any folder): the scan runs in a forked child that
    drops to nobody, in a folder nobody can reach, and sends back what it raised."""
    import shutil
    import tempfile

    from gangen.readers import scan_images

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (as a user, make a folder unreadable and scan it)")
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's 0700
    try:
        top.chmod(0o755)
        root = make_folder(top / "imgs", {f"{c}/{i}.png": ("L", (8, 8)) for c in "ab" for i in range(2)})
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "b").chmod(0o000)
        assert as_nobody(lambda: scan_images(root)) == (
            f"DataNotFoundError: cannot read folder {root / 'b'} under {root} (Permission denied): its images would "
            "be left out; make it readable (chmod), or move it out of --data.root"
        )
        assert scan_images(root)[2] == 2  # root reads it: both classes
    finally:
        (top / "imgs" / "b").chmod(0o755)
        shutil.rmtree(top)


def test_an_unreadable_lost_and_found_is_skipped_not_an_error(tmp_path):
    """The root of an ext4 disk holds root's 0700 lost+found, which a user can neither read nor move: with the
    disk as --data.root the scan stopped on it. A lost+found the user cannot read is skipped (it holds fsck's
    fragments, not images); another unreadable folder is still an error. The scan runs as nobody, as above."""
    import shutil
    import tempfile

    from gangen.readers import scan_images

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (as a user, make a folder unreadable and scan it)")
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's 0700
    try:
        top.chmod(0o755)
        root = make_folder(top / "imgs", {f"{c}/{i}.png": ("L", (8, 8)) for c in "ab" for i in range(2)})
        (root / "lost+found").mkdir()
        (root / "a" / "lost+found").mkdir()  # at any depth
        (root / "lost+found" / "0.png").write_bytes((root / "a" / "0.png").read_bytes())  # nobody cannot see it
        (root / "c").mkdir()
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        for path in root / "lost+found", root / "a" / "lost+found":
            path.chmod(0o700)

        def scan_as_nobody() -> str:
            def scan() -> str:
                lines: list[str] = []
                files, labels, classes = scan_images(root, lines.append)
                return f"{[str(f.relative_to(root)) for f in files]} {labels} {classes} {lines}"

            return as_nobody(scan)

        assert scan_as_nobody() == (
            "['a/0.png', 'a/1.png', 'b/0.png', 'b/1.png'] [0, 0, 1, 1] 2 ['gangen: class folders without images "
            f"under {root} are skipped, not classes: c (labels 0..1 number the 2 that hold images)']"
        )
        (root / "c").chmod(0o000)  # any other name is still named, not left out
        assert scan_as_nobody() == (
            f"DataNotFoundError: cannot read folder {root / 'c'} under {root} (Permission denied): its images would "
            "be left out; make it readable (chmod), or move it out of --data.root"
        )
        assert scan_images(root)[2] == 3  # root reads lost+found: its image is a class, as before
    finally:
        for path in [top, *top.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(top)

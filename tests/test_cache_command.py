"""`gangen cache`: list gangen's caches and remove them, by last use; a killed build's leftovers too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, run_cli
from test_data import TREE, make_folder

from gangen import cache_dir, decoded, metrics
from gangen.data import ImageDataModule

DAY = 86400


def decoded_caches(root: Path, cache: Path, resolutions: tuple[int, ...]) -> list[Path]:
    """Real decoded caches of an image folder (train split, one per resolution)."""
    for resolution in resolutions:
        dm = ImageDataModule(dataset="image_folder", root=str(root), resolution=resolution, channels=3,
                             batch_size=2, cache_dir=str(cache))  # fmt: skip
        dm._split("train")
    return sorted(cache.iterdir())


def real_stats_file(folder: Path) -> Path:
    key = dict(dataset="fashion_mnist", split="val", resolution=32, channels=1, num_samples=16,
               feature_extractor="inception", weights_sha256="0" * 64)  # fmt: skip
    path = metrics.cache_file(key, folder)
    path.parent.mkdir(parents=True)
    torch.save({"key": key, "mean": torch.zeros(4), "cov": torch.eye(4), "features": torch.zeros(16, 4)}, path)
    return path


def age(path: Path, days: float) -> None:
    """Set the entry (and, for a folder, its files) to last modified `days` ago."""
    stamp = time.time() - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (stamp, stamp))


KILLED_BUILD = """
import sys, time
from pathlib import Path
import torch
from gangen import decoded
class Slow(torch.utils.data.Dataset):
    def __len__(self): return 600
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.zeros(3, 8, 8, dtype=torch.uint8), 0
decoded.build(Slow(), Path(sys.argv[1]) / "image_folder-8px-3ch-n600-0123456789abcdef", processes=1)
"""


def killed_build(folder: Path) -> Path:
    """SIGKILL a real decode build once its temporary folder exists; returns what it left behind."""
    before = set(folder.iterdir()) if folder.is_dir() else set()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not (folder.is_dir() and any(folder.glob(".*/images.npy"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [left] = set(folder.iterdir()) - before
    return left


def test_list_then_clean_by_last_use(tmp_path):
    images = make_folder(tmp_path / "imgs", TREE)
    decoded_dir, stats_dir = tmp_path / "cache" / "decoded", tmp_path / "cache" / "real_stats"
    old, recent = decoded_caches(images, decoded_dir, (8, 16))
    stats = real_stats_file(stats_dir)
    leftover = killed_build(decoded_dir)
    assert leftover.name.startswith(".image_folder-8px-3ch-n600-") and (leftover / "images.npy").is_file()
    foreign = decoded_dir / "notes.txt"  # not gangen's: never listed, never removed
    foreign.write_text("keep me")
    age(old, 10)
    age(stats, 40)
    age(recent, 10)
    decoded.load(recent)  # loading marks it used now

    env = {"GANGEN_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli("cache", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("4 entries, ")
    listed = {Path(line.split()[-1] if "unfinished" not in line else line.split()[-2]) for line in lines[:-1]}
    assert listed == {old, recent, stats, leftover}
    assert "used 10.0 days ago" in next(line for line in lines if str(old) in line)
    assert "(unfinished)" in next(line for line in lines if str(leftover) in line)

    r = run_cli("cache", "--clean", "--unused_days", "7", env=env)
    assert r.returncode == 0, r.stderr
    assert not old.exists() and not stats.exists()  # unused for 10 and 40 days
    assert recent.exists() and foreign.read_text() == "keep me"
    assert leftover.exists()  # written seconds ago: a build may still be running
    assert r.stdout.splitlines()[-1].startswith("removed 2 entries, ")
    assert "kept 0" not in r.stdout

    age(leftover, 0.5)  # abandoned for 12 hours
    r = run_cli("cache", "--clean", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in decoded_dir.iterdir()) == ["notes.txt"] and list(stats_dir.iterdir()) == []
    r = run_cli("cache", env=env)
    assert r.stdout.strip() == f"no gangen caches in {decoded_dir}, {stats_dir}"


def test_recent_unfinished_entry_is_kept_and_said(tmp_path):
    leftover = killed_build(tmp_path / "d")
    r = run_cli("cache", "--clean", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert leftover.exists() and "kept 1 unfinished written in the last hour" in r.stdout
    assert cache_dir.removable(cache_dir.entries([tmp_path / "d"])[0], 0) is False


def test_bad_unused_days_is_one_line(tmp_path):
    r = run_cli("cache", "--clean", "--unused_days", "-3", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--unused_days -3.0 must be >= 0" in r.stderr


def test_a_cache_root_stands_for_its_decoded_and_real_stats_folders(tmp_path, capsys):
    """`gangen cache --clean X` with X what $GANGEN_CACHE_DIR points to (holding decoded/ and real_stats/) said
    "removed 0 entries" and left every entry there; now it lists and cleans those two folders."""
    from gangen.cli import main

    root = tmp_path / "cache_copy"
    caches = decoded_caches(make_folder(tmp_path / "imgs", TREE), root / "decoded", (8,))
    stats = real_stats_file(root / "real_stats")
    main(["cache", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("2 entries, ") and lines[-1].endswith(f"in {root / 'decoded'}, {root / 'real_stats'}")
    main(["cache", "--clean", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("removed 2 entries, "), lines
    assert not stats.exists() and not any(p.exists() for p in caches)
    assert sorted(p.name for p in root.iterdir()) == ["decoded", "real_stats"]  # the folders themselves stay

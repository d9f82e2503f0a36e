"""What gangen keeps under its cache root, and removing it: `gangen cache [--clean] [--unused_days D]`.

Two kinds of entries, both named by gangen and recognised by name only (anything else in the folders is
never touched):
- `decoded/<dataset>-<R>px-<C>ch-n<N>-<digest>/` (gangen.decoded), one folder per decoded split;
- `real_stats/<dataset>-<split>-<R>px-<C>ch-n<N>-<digest>.pt` (gangen.metrics), real-image statistics.
Unfinished ones are the temporary `.<name>.<random>` folders and files a killed build or write leaves behind.
"Last used" is the modification time, which loading a cache refreshes (`touch`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gangen.errors import ConfigError

_NAME = r"[A-Za-z0-9_.-]+-\d+px-\d+ch-n\d+-[0-9a-f]{16}"
_DECODED = re.compile(rf"{_NAME}")
_STATS = re.compile(rf"{_NAME}\.pt")
_UNFINISHED = re.compile(rf"\.{_NAME}(\.pt)?\..+")  # mkdtemp / mkstemp names: .<name>.<random>[.pt]
ABANDONED_S = 3600.0  # an unfinished entry untouched this long belongs to no running build


@dataclass
class Entry:
    path: Path
    size: int  # bytes
    age_s: float  # seconds since last use (finished) or last write (unfinished)
    unfinished: bool


def creation_mode(mode: int) -> int:
    """`mode` less the process umask: what open() / mkdir() would give (mkstemp / mkdtemp give 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def not_a_folder(folder: str | Path) -> Path | None:
    """What stops `folder` from being, or being made, a folder: itself or the nearest existing path above it when
    that is a file; else None (a path on the way that cannot be searched: the write reports it)."""
    existing = Path(folder).expanduser().absolute()
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError:
        return None
    return None if existing.is_dir() else existing


def touch(path: Path) -> None:
    """Mark a cache entry as used now; a read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _age(path: Path, now: float) -> float:
    """Seconds since the entry (or, for a folder being written, its newest file) was last modified."""
    times = [path.stat().st_mtime] + ([p.stat().st_mtime for p in path.rglob("*")] if path.is_dir() else [])
    return max(0.0, now - max(times))


def entries(folders: list[Path]) -> list[Entry]:
    """gangen's cache entries in `folders` (missing folders hold none), sorted by path."""
    now, found = time.time(), []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            unfinished = bool(_UNFINISHED.fullmatch(path.name)) and not path.is_symlink()
            finished = (path.is_dir() and _DECODED.fullmatch(path.name)) or (
                path.is_file() and _STATS.fullmatch(path.name)
            )
            if (finished or unfinished) and not path.is_symlink():
                found.append(Entry(path, _size(path), _age(path, now), unfinished))
    return found


def removable(entry: Entry, unused_days: float) -> bool:
    """Unused for at least unused_days; an unfinished entry only once it is abandoned as well."""
    return entry.age_s >= unused_days * 86400 and (not entry.unfinished or entry.age_s >= ABANDONED_S)


def remove(entry: Entry) -> None:
    if entry.path.is_dir():
        # out of its name first (atomic): an interrupted removal leaves an unfinished entry, never a decoded
        # folder missing some of its files
        doomed = entry.path if entry.unfinished else entry.path.with_name(f".{entry.path.name}.removing")
        if doomed != entry.path:
            entry.path.rename(doomed)
        shutil.rmtree(doomed)
    else:
        entry.path.unlink(missing_ok=True)


def describe(entry: Entry) -> str:
    days = entry.age_s / 86400
    when = f"{'written' if entry.unfinished else 'used'} {days:.1f} days ago"
    return f"{human(entry.size):>10}  {when:<22} {entry.path}{'  (unfinished)' if entry.unfinished else ''}"


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The lowest memory limit in bytes set on this process's cgroup or any cgroup above it (Linux cgroup v1
    memory.limit_in_bytes or v2 memory.max; a container or a batch job's allocation), None where none is set or
    readable. A cgroup mounted as the container's own (the path in /proc/self/cgroup absent under the mount) is
    read at the mount's top."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: the unified hierarchy
            base = Path(root) if (Path(root) / "cgroup.controllers").exists() else Path(root) / "unified"
            name = "memory.max"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
            try:
                value = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 2**62:  # "max" (v2), or v1's "unlimited" 2**63 - page
                limits.append(int(value))
    return min(limits, default=None)


def usable_memory() -> tuple[int, str] | None:
    """(bytes, words) for the memory this process may use: this machine's RAM, or its cgroup's limit where that is
    lower. The words finish "more than ..." in messages. None where neither is known (not POSIX)."""
    ram, limit = physical_memory(), cgroup_memory_limit()
    if limit is not None and (ram is None or limit < ram):
        return limit, f"the {human(limit)} this process may use (its cgroup's memory limit)"
    return (ram, f"this machine's {human(ram)} of memory") if ram is not None else None


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def check_days(unused_days: float) -> None:
    if not unused_days >= 0:
        raise ConfigError(f"--unused_days {unused_days!r} must be >= 0 (0: every entry)")

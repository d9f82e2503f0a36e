"""Read an offline (or synced) W&B run from its files: history, config and summary of `run-<id>.wandb`.

wandb >= 0.2x no longer ships a Python reader of its binary run file. The format is LevelDB's log format:
a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a
7-byte header (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: FULL=1, FIRST=2, MIDDLE=3,
LAST=4) followed by a chunk of a `wandb.proto.wandb_internal_pb2.Record` protobuf.

    from gangen.wandb_files import read_run
    run = read_run("runs/gangen/<id>/wandb/offline-run-*")   # or the .wandb file itself
    run.history    # [{"loss/d": 1.3, "trainer/global_step": 9, "_step": 0, ...}, ...], in logged order
    run.config     # the run's config (gangen logs the resolved CLI config here)
    run.summary    # the last value of every key
"""

from __future__ import annotations

import glob
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gangen.errors import DataNotFoundError

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7  # crc32 (4) + length (2) + type (1); the file header is 7 bytes too
FILE_MAGIC = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_file(path: str | Path) -> Path:
    """The run-*.wandb file of a run folder (a glob pattern matching one folder is fine) or the file itself."""
    return run_files(path)[-1]


def run_files(path: str | Path) -> list[Path]:
    """The run-*.wandb files of the folders (or files) `path` matches, oldest first: one run, or the segments
    of one run resumed with the same id (each process writes an offline-run-<time>-<id> folder of its own)."""
    files = []
    for match in sorted(glob.glob(str(path))) or [str(path)]:  # offline-run-<YYYYmmdd_HHMMSS>-<id>: by time
        candidate = Path(match)
        found = sorted(candidate.glob("run-*.wandb")) if candidate.is_dir() else [candidate]
        files += [f for f in found[-1:] if f.suffix == ".wandb" and f.is_file()]
    if not files:
        raise DataNotFoundError(f"no W&B run file (run-*.wandb) at {path}: pass a wandb/offline-run-* or run-* folder")
    ids = sorted({f.stem.removeprefix("run-") for f in files})
    if len(ids) > 1:
        raise DataNotFoundError(f"{path} matches the W&B runs {', '.join(ids)}: pass one run's folders")
    return files


def read_chunks(data: bytes) -> Iterator[bytes]:
    """The payloads of the log-format records in `data`, reassembled from FIRST/MIDDLE/LAST pieces."""
    if data[:4] != FILE_MAGIC:
        raise DataNotFoundError("not a W&B run file: it does not start with ':W&B'")
    pos, parts = HEADER_SIZE, []
    while pos + HEADER_SIZE <= len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < HEADER_SIZE:  # a block tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_SIZE])
        if kind == 0:  # zeros: padding to the end of the block (or an unfinished file)
            pos += left
            continue
        chunk = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        pos += HEADER_SIZE + length
        if len(chunk) < length:  # a record cut off by a run still writing: stop here
            return
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join([*parts, chunk])
            parts = []


def read_records(path: str | Path) -> Iterator[Any]:
    """Every `wandb_internal_pb2.Record` of a run file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    for chunk in read_chunks(run_file(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        yield record


def _items(items: Any) -> dict[str, Any]:
    """{key: value} of a repeated HistoryItem / ConfigItem / SummaryItem (values are JSON)."""
    out: dict[str, Any] = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


@dataclass
class WandbRun:
    """What a run file holds: one dict per history row, the config and the summary."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def values(self, key: str) -> list[Any]:
        """Every logged value of `key`, in order (rows without it are skipped)."""
        return [row[key] for row in self.history if key in row]


def read_run(path: str | Path) -> WandbRun:
    """History, config and summary of an offline or synced W&B run folder (or its run-*.wandb file); a
    pattern matching the folders of one resumed run reads them all, in order (history appended, config and
    summary updated), as W&B shows the run. `path` of the result is the newest file."""
    files = run_files(path)
    run = WandbRun(files[-1])
    records = (record for file in files for record in read_records(file))
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "config":
            run.config.update(_items(record.config.update))
            for item in record.config.remove:
                run.config.pop(item.key or "/".join(item.nested_key), None)
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "run":
            run.config.update(_items(record.run.config.update))
    # wandb stores config values as {"value": v, "desc": ...}; unwrap them
    run.config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in run.config.items()}
    return run

"""Shared fixtures. Real data: Debian's dataset-fashion-mnist (see .ci/run)."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "dcgan_fashion_mnist.yaml"


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """gangen's caches (decoded datasets, real statistics) of this session, in-process and in CLI subprocesses,
    go to a temporary folder, not ~/.cache/gangen."""
    os.environ["GANGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gangen_cache"))


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a subprocess, as a user runs it; `env` adds (or, with None, removes) variables."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GANGEN_DEBUG": None, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def fails(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns that line."""
    from gangen.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def assert_fit_refused(capsys, save_dir: Path, extra: list[str], needles: list[str]) -> None:
    """`fit` of the demo config plus `extra` stops with one `gangen: error:` line holding every needle and
    writes nothing under save_dir (no run folder, config or checkpoint)."""
    line = fails(capsys, "fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
                 "--trainer.default_root_dir", str(save_dir), *extra)  # fmt: skip
    assert line.startswith("gangen: error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert list(save_dir.iterdir()) == []


def tiny_fit_args(save_dir: Path, *extra: str) -> list[str]:
    """The demo config cut down to a few steps on 640 real Fashion-MNIST images."""
    return [
        "fit", "--config", str(DEMO_CONFIG),
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.max_epochs", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--data.limit", "640",
        "--data.batch_size", "64",
        "--trainer.log_every_n_steps", "5",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Run folder of a short real CLI fit (2 epochs x 10 batches); holds checkpoints/last.ckpt."""
    save_dir = tmp_path_factory.mktemp("runs")
    result = run_cli(*tiny_fit_args(save_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    run = save_dir / "dcgan_fashion_mnist" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file(), sorted(p.name for p in run.rglob("*"))
    return run


@pytest.fixture(scope="session")
def trained_ckpt(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A ~96 MB InceptionV3 state_dict with random He-initialised values, as torch-fidelity loads it.

    The real weights cannot be downloaded here; FIDs computed with this file separate image sets but mean
    nothing outside the test session.
    """
    from gangen.inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory) -> Path:
    """A domain classifier at the demo's 32x32x1 (metric/fd_fmnist), trained briefly on real Fashion-MNIST labels:
    much cheaper on CPU than Inception at 299 px."""
    from gangen.classifier import save_classifier, train_classifier
    from gangen.data import ImageDataModule

    classifier, accuracy = train_classifier(
        ImageDataModule(limit=1000, batch_size=64), epochs=1, enable_progress_bar=False, accelerator="cpu"
    )
    return save_classifier(classifier, tmp_path_factory.mktemp("clf") / "fmnist.pt", accuracy=accuracy)


class SilentServer:
    """A loopback TCP server that accepts every connection and never sends a byte: a server that hangs.

    `url` is http://127.0.0.1:PORT; `connections` counts the connections accepted (exact once closed). They stay
    open until the server closes, or until `hang_guard_s` has passed: then the connections and the port close,
    so a client that ignores its timeout fails (connection closed or refused) instead of hanging the tests.
    The guard is no measured limit: a client that keeps its timeout gives up long before it.
    """

    def __init__(self, hang_guard_s: float = 60) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(time.monotonic() + hang_guard_s,), daemon=True)
        self._thread.start()

    def _serve(self, guard_at: float) -> None:
        held = []
        while not self._stop.is_set() and time.monotonic() < guard_at:
            try:
                held.append(self._listener.accept()[0])
            except TimeoutError:
                continue
        self._listener.setblocking(False)
        while True:  # count the connections still queued (made, never accepted): a closed one counts too
            try:
                held.append(self._listener.accept()[0])
            except BlockingIOError:
                break
        self.connections = len(held)
        for connection in held:
            connection.close()
        self._listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def file_server(files: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """A loopback http.server serving `files` ({name: path}) at <url>/<name>. Yields (url, requests): the
    paths of the GET requests so far; any other name is a 404."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            path = files.get(self.path.lstrip("/"))
            if path is None:
                self.send_error(404, "File not found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as f:
                try:
                    while chunk := f.read(1 << 20):
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):  # a client that read only the start (redirect check)
                    pass

        def log_message(self, *args: object) -> None:  # no request lines on stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        thread.join()
        server.server_close()

"""Safe checkpoints: atomic writes under a real SIGKILL, code payloads refused everywhere, safetensors export,
divergence stops training without overwriting the last good checkpoint, a download from a server that
never answers times out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SilentServer, run_cli, tiny_fit_args
from safetensors import safe_open

from gangen import inception
from gangen.errors import DataNotFoundError
from gangen.reliability import AtomicCheckpointIO

# ---- atomic checkpoint writes ------------------------------------------------------------------------------
SLOW_WRITER = """
import os, sys, time, torch
from gangen.reliability import AtomicCheckpointIO

os.fsync = lambda fd: time.sleep(60)  # a slow disk: the write is under way, not yet renamed, when we are killed
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(16 * 2**20)}, sys.argv[1])  # 64 MB
"""


def test_sigkill_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5)}, path)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # somewhere between the first byte and the rename
    assert proc.wait() == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))  # intact, not truncated
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # hidden, never matches last*.ckpt
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(6)}, path)  # the next good write of that file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # removes the killed writer's tmp file


def test_atomic_writes_get_the_permissions_of_any_new_file(tmp_path):
    """Checkpoints, grids, npz and JSON went through mkstemp, whose files are private (0600): other users of a
    shared machine or group could not read a run's checkpoints and samples."""
    from gangen.sampling import atomic_file, save_grid

    umask = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5)}, tmp_path / "last.ckpt")
        save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png", nrow=2)
        atomic_file(tmp_path / "out.json", lambda tmp: Path(tmp).write_text("{}"))
        with open(tmp_path / "plain.txt", "w") as f:  # what open() gives under the same umask
            f.write("x")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"last.ckpt": 0o644, "grid.png": 0o644, "out.json": 0o644, "plain.txt": 0o644}


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "last.ckpt"
    with pytest.raises(Exception):  # noqa: B017 (pickle raises a version-dependent type for a lambda)
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3), "f": lambda: 0}, path)
    assert list(tmp_path.iterdir()) == []


# ---- code payloads -----------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates `marker` (open(marker, "w")): code that must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def payload_ckpt(trained_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("payload")
    marker = folder / "pwned"
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["extra"] = Payload(marker)
    path = folder / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_payload_is_real(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "extra": Payload(marker)}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)["extra"].close()  # unsafe on purpose
    assert marker.exists()  # so the refusals below really kept code from running


@pytest.mark.parametrize("command", ["generate", "evaluate", "export", "fit"])
def test_payload_refused_everywhere(payload_ckpt, tmp_path, command):
    path, marker = payload_ckpt
    args = {
        "generate": ["generate", "--ckpt_path", str(path), "--output", str(tmp_path / "g.png")],
        "evaluate": ["evaluate", "--ckpt_path", str(path), "--output", str(tmp_path / "m.json")],
        "export": ["export", "--ckpt_path", str(path), "--output", str(tmp_path / "g.safetensors")],
        "fit": tiny_fit_args(tmp_path, "--ckpt_path", str(path)),
    }[command]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("gangen: error: checkpoint") and "evil.ckpt" in line and "pickled code" in line
    assert "(io.open)" in line and "nothing in it was run" in line
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []  # no run folder, config or output


# ---- export to safetensors ---------------------------------------------------------------------------------
def test_export_and_generate_from_safetensors(trained_ckpt, tmp_path):
    out = tmp_path / "generator.safetensors"
    r = run_cli("export", "--ckpt_path", str(trained_ckpt), "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote the generator of {trained_ckpt} to {out}" in r.stdout
    ckpt = torch.load(trained_ckpt, weights_only=True)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert json.loads(meta["generator"]) == ckpt["hyper_parameters"]["generator"]
    assert json.loads(meta["data"])["dataset"] == "fashion_mnist" and json.loads(meta["ema"]) is False
    expected = {k[len("generator.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    arrays = []
    for source in (trained_ckpt, out):
        npz = tmp_path / f"{source.suffix[1:]}.npz"
        r = run_cli("generate", "--ckpt_path", str(source), "--num_samples", "8", "--output", str(npz))
        assert r.returncode == 0, r.stderr[-2000:]
        arrays.append(np.load(npz)["arr_0"])
    np.testing.assert_array_equal(arrays[0], arrays[1])  # same images from the .ckpt and the export


def test_export_prefers_the_ema_generator(trained_ckpt, tmp_path):
    from gangen.cli import main

    ckpt = torch.load(trained_ckpt, weights_only=True)
    ema = {"generator_ema." + k[len("generator.") :]: v * 0.5 if v.is_floating_point() else v
           for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}  # fmt: skip
    ckpt["state_dict"].update(ema)
    torch.save(ckpt, tmp_path / "ema.ckpt")
    out = tmp_path / "g.safetensors"
    main(["export", "--ckpt_path", str(tmp_path / "ema.ckpt"), "--output", str(out)])
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["ema"]) is True
        assert all(torch.equal(f.get_tensor(k[len("generator_ema.") :]), v) for k, v in ema.items())
    main(["export", "--ckpt_path", str(tmp_path / "ema.ckpt"), "--output", str(out), "--no_ema"])
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["ema"]) is False


# ---- divergence --------------------------------------------------------------------------------------------
def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    steps = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        "4",
        "--trainer.callbacks.save_last",
        "true",
        "--trainer.callbacks.filename",
        "{step}",
    ]  # fmt: skip  (every 2 batches)
    poison = ["--trainer.callbacks+=fault_probe.PoisonAt", "--trainer.callbacks.step", "10"]  # at batch 6
    r = run_cli(*tiny_fit_args(tmp_path, *steps, *poison), env={"PYTHONPATH": str(ROOT / "tests")})
    assert r.returncode == 3, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("gangen: error: training diverged: a loss became nan/inf") and "lower learning rate" in line
    folder = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=8.ckpt"]  # no step 12 (top-1)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["gangen"]["batches_seen"] == 4
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())


def test_a_loss_gone_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """DDP: the batch's losses went nan on rank 1 only (its weights, not yet the all-reduced gradients). Rank 1
    alone raised and left rank 0 in its next collective; when all ranks stopped, each printed the line."""
    ddp = ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--model.check_finite_every", "1"]
    poison = [
        "--trainer.callbacks+=fault_probe.PoisonAt",
        "--trainer.callbacks.step",
        "10",
        "--trainer.callbacks.rank",
        "1",
    ]
    r = run_cli(*tiny_fit_args(tmp_path, *ddp, *poison), env={"PYTHONPATH": str(ROOT / "tests")}, timeout=240)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("gangen: error: training diverged"), r.stderr[-3000:]
    assert "(batch 6)" in errors[0]  # found at the batch it happened in, on every rank


GLOO_THREADS_AT_EXIT = """
import os, tempfile, torch, torch.distributed as dist
from gangen import cli
from gangen.errors import DivergenceError

torch.set_num_threads(1)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()

def diverge(argv):
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(tempfile.mktemp(), 1))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()  # the reducer's gradient all-reduce: gloo's threads at work
    dist.all_reduce(torch.ones(1))
    print("with the group:", threads() - before, flush=True)
    raise DivergenceError("training diverged")  # its traceback holds `model`, whose reducer holds the group

destroy = dist.destroy_process_group
def destroyed(*args, **kwargs):  # what the shutdown inherits: gloo's threads, if the group outlived this
    destroy(*args, **kwargs)
    print("after destroy_process_group:", threads() - before, flush=True)
dist.destroy_process_group = destroyed
cli.COMMANDS["diverge"] = diverge
cli.main(["diverge"])
"""


def test_an_error_leaves_no_gloo_thread_to_the_interpreters_shutdown(tmp_path):
    """A gangen error under DDP (a divergence) left the DDP model alive in its traceback's frames, so
    destroy_process_group only unregistered the group and its gloo threads lived on into the shutdown, where
    one could abort the process (exit -6 instead of 3 once in CI, 1 in 38 runs of the test above)."""
    script = tmp_path / "diverge.py"
    script.write_text(GLOO_THREADS_AT_EXIT)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 3 and r.stderr.strip() == "gangen: error: training diverged", r.stderr[-3000:]
    started = int(r.stdout.split("with the group:")[1].split()[0])
    assert started >= 2 and "after destroy_process_group: 0" in r.stdout, r.stdout  # gloo's threads joined


def test_nonfinite_check_runs_every_n_batches_only():
    from gangen import GAN, DCGANDiscriminator, DCGANGenerator
    from gangen.errors import DivergenceError

    gan = GAN(DCGANGenerator(resolution=16, channels=1, base_channels=8),
              DCGANDiscriminator(resolution=16, channels=1, base_channels=8), check_finite_every=3)  # fmt: skip
    for _ in range(2):  # batches 1, 2: a nan is folded into the flag, not looked at yet
        gan.batches_seen += 1
        gan._track_finite([torch.tensor(float("nan")), torch.tensor(1.0)])
    gan.batches_seen += 1
    with pytest.raises(DivergenceError, match="batch 3"):
        gan._track_finite([torch.tensor(1.0)])  # batch 3: the check sees the earlier nan


# ---- network -----------------------------------------------------------------------------------------------
def test_download_from_a_server_that_never_answers_times_out(tmp_path):
    """The download's socket timeout is what ends it: the server takes the connection and never answers (a
    10.x "unroutable" address was answered 404 at once by this sandbox's network, so no timeout was tested)."""
    dest = tmp_path / inception.INCEPTION_FILENAME
    with SilentServer(hang_guard_s=60) as server:
        url = f"{server.url}/{dest.name}"
        with pytest.raises(DataNotFoundError) as err:
            inception.download_inception_weights(dest, timeout=1, url=url)
    assert server.connections == 1
    assert str(err.value) == (
        f"download of {url} failed (timed out): check the network, or fetch the file elsewhere and pass "
        "--metrics.inception_weights PATH (or $GANGEN_INCEPTION_WEIGHTS)"
    )
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file

"""W&B with the real wandb package: an offline fit read back from its run file, and runs that must not hang."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, ROOT, SilentServer, fails, run_cli, tiny_fit_args
from PIL import Image

from gangen.classifier import save_classifier, train_classifier
from gangen.data import ImageDataModule
from gangen.wandb_files import BLOCK_SIZE, read_chunks, read_records, read_run

WANDB_CONFIG = str(ROOT / "configs" / "logger" / "wandb.yaml")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's folders, settings and credentials confined to tmp_path: no key, no netrc, nothing leaks."""
    env = {"HOME": tmp_path / "home", "WANDB_DIR": tmp_path / "wandb_dir", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_DATA_DIR": tmp_path / "data",
           "NETRC": tmp_path / "netrc"}  # fmt: skip
    for key, value in env.items():
        if key != "NETRC":  # NETRC names a file that does not exist: no credentials
            value.mkdir(exist_ok=True)
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "GANGEN_WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return {k: str(v) for k, v in env.items()} | {"WANDB_API_KEY": None, "WANDB_MODE": None}


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A domain classifier for metric/fd_clf (much cheaper on CPU than Inception at 299 px)."""
    classifier, accuracy = train_classifier(
        ImageDataModule(limit=1000, batch_size=64), epochs=1, enable_progress_bar=False, accelerator="cpu"
    )
    return save_classifier(classifier, tmp_path_factory.mktemp("clf") / "clf.pt", accuracy=accuracy)


def test_offline_fit_logs_losses_fd_grids_and_config(tmp_path, wandb_env, classifier_file):
    runs = tmp_path / "runs"
    args = tiny_fit_args(
        runs, "--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.logger.init_args.tags", "[test, cpu]", "--trainer.logger.init_args.group", "g1",
        "--metrics.feature_extractor", str(classifier_file),
        "--metrics.num_samples", "16", "--metrics.num_real", "16", "--metrics.cache_dir", str(tmp_path / "cache"),
        "--data.limit", "320",
    )  # fmt: skip
    r = run_cli(*args, env=wandb_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no API key found" in r.stderr and "wandb sync" in r.stderr  # went offline, said so once
    assert r.stderr.count("gangen: W&B:") == 1
    assert "git root" not in r.stderr  # the run folder exists before wandb.init looks for the git checkout
    assert "gangen: global batch 64 = 64 per device x 1 device x 1 node" in r.stdout
    [run] = list((runs / "gangen").iterdir())  # one folder per run: runs/<project>/<run id>
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch=1-step=20.ckpt", "last.ckpt"]  # global_step: 2 optimizers x 10 batches
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "kimg000000.png"]
    assert (run / "config.yaml").is_file()
    [offline] = list((run / "wandb").glob(f"offline-run-*-{run.name}"))

    logged = read_run(offline)
    assert len(list((offline / "files" / "media" / "images").glob("samples_*.png"))) == 2  # the two grids
    steps = logged.values("trainer/global_step")
    grids = [row for row in logged.history if row.get("samples/_type") == "images/separated"]
    assert len(grids) == 2 and grids[0]["trainer/global_step"] == 0
    scalar_steps = [row["trainer/global_step"] for row in logged.history if "loss/d" in row]
    assert grids[-1]["trainer/global_step"] == max(steps) == 10  # the final grid sits on the scalars' last step
    assert scalar_steps == sorted(scalar_steps) and max(scalar_steps) <= 10  # 2 epochs x 5 batches
    for grid, png in zip(grids, ["kimg000000.png", "final.png"], strict=True):  # the PNGs' pixels: a float grid
        [name] = grid["samples/filenames"]  # in [0, 1] was cast to uint8 by wandb, all black
        pixels = np.asarray(Image.open(offline / "files" / name))
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(run / "samples" / png)))
        assert pixels.max() > 0
    losses = logged.values("loss/g")
    assert len(losses) == 2 and all(isinstance(x, float) for x in losses)  # every 5 of 10 batches
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged.values("metric/fd_clf") == pytest.approx([row["fd_clf"] for row in jsonl]) and len(jsonl) == 2
    metric_steps = [row["trainer/global_step"] for row in logged.history if "metric/fd_clf" in row]
    assert [row["step"] for row in jsonl] == metric_steps  # metrics.jsonl names the loggers' step
    assert logged.values("metric/num_samples") == [16, 16]
    # the resolved CLI config, nested as in config.yaml
    assert logged.config["trainer"]["max_epochs"] == 2 and logged.config["data"]["limit"] == 320
    assert logged.config["metrics"]["num_samples"] == 16
    assert logged.config["trainer"]["logger"]["class_path"] == "gangen.tracking.WandbLogger"
    assert logged.summary["metric/fd_clf"] == pytest.approx(jsonl[-1]["fd_clf"])
    assert not list(offline.rglob("model-*"))  # no checkpoint artifacts offline: they stay in checkpoints/

    # README: the same run id and --ckpt_path last resume it (W&B loggers have no root_dir: the lookup used to
    # search the working directory only and train from scratch into the same run)
    more = [*args, "--trainer.logger.init_args.id", run.name, "--ckpt_path", "last", "--trainer.max_epochs", "3"]
    r = run_cli(*more, env=wandb_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {run / 'checkpoints' / 'last.ckpt'}" in r.stdout
    assert [p.name for p in (runs / "gangen").iterdir()] == [run.name]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=2-step=30.ckpt", "last.ckpt"]
    # each segment's config is kept: the resume used to overwrite the first one's config.yaml
    first, latest = (yaml.safe_load((run / name).read_text()) for name in ("config.1.yaml", "config.yaml"))
    assert (first["trainer"]["max_epochs"], first["ckpt_path"]) == (2, None)
    assert (latest["trainer"]["max_epochs"], latest["ckpt_path"]) == (3, "last")
    # each process wrote its own offline-run-*-<id> folder; the README's pattern reads both, in order (it read
    # the newest only: the history before the resume was silently dropped)
    segments = sorted((run / "wandb").glob(f"offline-run-*-{run.name}"))
    assert len(segments) == 2 and segments[0] == offline
    whole = read_run(run / "wandb" / "offline-run-*")
    assert whole.history[: len(logged.history)] == logged.history and len(whole.history) > len(logged.history)
    assert max(whole.values("trainer/global_step")) == 15 and whole.values("metric/num_samples") == [16, 16, 16]
    assert whole.summary["trainer/global_step"] == 15 and whole.path.parent == segments[1]


def test_two_process_offline_fit_is_one_run_logged_once(tmp_path, wandb_env):
    """DDP (2 CPU processes, gloo) with the W&B logger: the launched rank reuses rank 0's run id and logs
    nothing itself, so there is one run folder, one offline run, and every step, grid and config once."""
    runs = tmp_path / "runs"
    args = tiny_fit_args(runs, "--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(runs),
                         "--trainer.devices", "2", "--trainer.accelerator", "cpu")  # fmt: skip
    r = run_cli(*args, env=wandb_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stderr + r.stdout  # really two processes
    assert r.stderr.count("gangen: W&B:") == 1  # the offline warning, from rank 0 only
    [run] = list((runs / "gangen").iterdir())  # one folder: both ranks' logger has rank 0's run id
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=1-step=20.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "kimg000000.png"]
    [offline] = list((run / "wandb").glob("offline-run-*"))  # one offline run, written by rank 0
    assert offline.name.endswith(f"-{run.name}")
    assert [p.name for p in tmp_path.rglob("*.wandb")] == [f"run-{run.name}.wandb"]  # no run anywhere else
    logged = read_run(offline)
    scalar_steps = [row["trainer/global_step"] for row in logged.history if "loss/d" in row]
    assert scalar_steps == [4, 9]  # 2 epochs x 5 batches per rank, logged every 5: each step once
    grids = [row["trainer/global_step"] for row in logged.history if row.get("samples/_type") == "images/separated"]
    assert grids == [0, 10]  # the two grids, once each
    assert len(list((offline / "files" / "media" / "images").glob("samples_*.png"))) == 2
    configs = [record for record in read_records(offline) if record.WhichOneof("record_type") == "config"]
    logged_config = [record for record in configs if any(item.key == "trainer" for item in record.config.update)]
    assert len(logged_config) == 1  # the resolved CLI config, once
    assert logged.config["trainer"]["devices"] == "2" and logged.config["data"]["limit"] == 640


@pytest.mark.parametrize("how", [["--trainer.logger.init_args.offline", "false"], "WANDB_MODE=online"])
def test_online_without_key_is_refused_before_any_connection(capsys, tmp_path, wandb_env, monkeypatch, how):
    """Refused up front: W&B's server (here a loopback port that would hang whoever connects) is never contacted."""
    extra = how if isinstance(how, list) else []
    if isinstance(how, str):
        monkeypatch.setenv(*how.split("="))
    with SilentServer() as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        line = fails(capsys, "fit", "--config", str(DEMO_CONFIG), "--config", WANDB_CONFIG,
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra)  # fmt: skip
    assert server.connections == 0
    assert line.startswith("gangen: error: W&B online was asked for") and "wandb login" in line
    assert f"no API key was found for {server.url}" in line
    assert "offline true" in line and ("offline: false" in line or "WANDB_MODE=online" in line)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("project", "a/b", "W&B project 'a/b': W&B takes 1-128 characters without / \\ # ? % :, choose another "
                           "--trainer.logger.init_args.project"),
        ("init_timeout", "-1", "--trainer.logger.init_args.init_timeout -1.0 must be > 0 (seconds)"),
    ],
)  # fmt: skip
def test_wandb_settings_it_refuses_are_one_line(capsys, tmp_path, wandb_env, option, value, expected):
    """A bad project name was reported as a server that did not start within 15 s (offline: no server), after
    making folders; a negative timeout was accepted."""
    line = fails(capsys, "fit", "--config", str(DEMO_CONFIG), "--config", WANDB_CONFIG,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 f"--trainer.logger.init_args.{option}", value)  # fmt: skip
    assert line == f"gangen: error: {expected}"
    assert not (tmp_path / "runs").exists()


def test_lightnings_own_wandb_logger_without_a_project_still_runs(tmp_path, wandb_env):
    """The project check is gangen's logger's: Lightning's WandbLogger (project None) was refused."""
    args = tiny_fit_args(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                         "--trainer.logger.init_args.offline", "true", "--trainer.logger.init_args.save_dir",
                         str(tmp_path), "--trainer.max_steps", "2")  # fmt: skip
    r = run_cli(*args, env=wandb_env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_server_that_never_answers_fails_after_init_timeout(tmp_path, wandb_env):
    """A W&B server that takes the connection and never answers: wandb.init gives up when init_timeout (3 s, not
    wandb's 90) runs out, and the run stops with one line. The subprocess timeout is only a hang guard."""
    runs = tmp_path / "runs"
    with SilentServer(hang_guard_s=300) as server:
        env = {**wandb_env, "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": server.url}
        args = tiny_fit_args(runs, "--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(runs),
                             "--trainer.logger.init_args.init_timeout", "3")  # fmt: skip
        r = run_cli(*args, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert server.connections > 0  # wandb reached the server: no refusal, the timeout ended the wait
    [line] = [x for x in r.stderr.splitlines() if x.startswith("gangen: error:")]
    assert f"did not start within 3 s at {server.url}" in line and "offline true" in line
    assert "context deadline exceeded" in line  # wandb's own words: its deadline, not a refused connection
    [log] = runs.glob("gangen/*/wandb/run-*/logs/debug.log")  # the timeout wandb.init worked with
    assert "communicating run to backend with 3.0 second timeout" in log.read_text()
    assert not list(runs.rglob("*.ckpt"))


def _log_format(payloads: list[bytes]) -> bytes:
    """Payloads written in the LevelDB log format W&B uses (the writer side of gangen.wandb_files)."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for payload in payloads:
        first = True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += b"\x00" * left
                continue
            piece, payload = payload[: left - 7], payload[left - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", 0, len(piece), kind) + piece
            first = False
            if not payload:
                break
    return bytes(out)


def test_reader_reassembles_records_across_blocks():
    payloads = [b"a" * 10, b"b" * (BLOCK_SIZE - 7 - 7 - 10 - 7 - 3), b"c" * 100_000, b"", b"d" * 5]
    assert list(read_chunks(_log_format(payloads))) == payloads  # padding, FIRST/MIDDLE/LAST, empty records
    with pytest.raises(Exception, match="not a W&B run file"):
        list(read_chunks(b"PK\x03\x04" + b"\x00" * 20))


def test_a_pattern_over_two_runs_is_refused(tmp_path):
    """Segments of one run are read together; folders of different runs are not mixed into one history."""
    from gangen.errors import DataNotFoundError

    for name, run_id in (("offline-run-20261127_090000-aaa", "aaa"), ("offline-run-20261127_100000-bbb", "bbb")):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"run-{run_id}.wandb").write_bytes(_log_format([]))
    with pytest.raises(DataNotFoundError, match="matches the W&B runs aaa, bbb: pass one run's folders"):
        read_run(tmp_path / "offline-run-*")
    assert read_run(tmp_path / "offline-run-*-bbb").history == []


def test_last_without_a_run_id_continues_the_newest_run(tmp_path, wandb_env):
    """Every start without --trainer.logger.init_args.id is a new run id and folder, so `--ckpt_path last`
    searched only the new, empty folder and trained from scratch. It continues the project's newest run with a
    last.ckpt now, in its folder and W&B run, as passing its id does; one with other settings is one line."""
    runs = tmp_path / "runs"
    args = tiny_fit_args(runs, "--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(runs),
                         "--trainer.logger.init_args.offline", "true", "--trainer.limit_val_batches", "1",
                         "--data.limit", "320", "--ckpt_path", "last")  # fmt: skip
    r = run_cli(*args, "--trainer.max_epochs", "1", env=wandb_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training from scratch" in r.stdout
    [run] = list((runs / "gangen").iterdir())
    at = args.index("--trainer.logger.init_args.offline")
    keyless = args[:at] + args[at + 2 :]  # offline for want of a key: the hint names the run folder
    r = run_cli(*keyless, env=wandb_env)  # the same command again (a requeued job), to epoch 2
    assert r.returncode == 0, r.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"wandb sync {run}/wandb/offline-run-*" in r.stderr  # the hint named the new id's folder, never made
    assert f"gangen: resuming from {last} (W&B run {run.name}, the newest of {runs / 'gangen'}" in r.stdout
    assert "exists and is not empty" not in r.stderr  # Lightning's warning: the run's own folder is full, rightly
    assert [p.name for p in (runs / "gangen").iterdir()] == [run.name]  # no second run folder
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 10  # 5 + 5, not 5 from scratch
    assert len(list((run / "wandb").glob(f"offline-run-*-{run.name}"))) == 2  # the same W&B run, resumed
    line = fails_cli(run_cli(*args, "--trainer.max_epochs", "3", "--model.loss", "hinge", env=wandb_env))
    assert f"--ckpt_path last found W&B run {run.name}" in line and "model.loss 'non_saturating'" in line
    assert f"--trainer.logger.init_args.id {run.name} to continue that run" in line
    for other in (["--model.seed", "1"], ["--model.generator.base_channels", "16"]):  # these refusals said to
        line = fails_cli(run_cli(*args, "--trainer.max_epochs", "3", *other, env=wandb_env))  # continue that run
        assert line.startswith(f"gangen: error: --ckpt_path last found W&B run {run.name} ({last}), which ")
        assert f"pass --trainer.logger.init_args.id <new id> for a new run, or continue run {run.name} with " in line
    assert line.endswith("its settings (--model.generator.base_channels 32)"), line
    assert [p.name for p in (runs / "gangen").iterdir()] == [run.name]
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 10  # untouched


def fails_cli(r) -> str:
    """A CLI subprocess refused with exit 2 and exactly one line on stderr: that line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_a_requeued_slurm_job_resuming_lightnings_hpc_checkpoint_continues_its_wandb_run(tmp_path, wandb_env):
    """Lightning's hpc_ckpt_*.ckpt lies in default_root_dir, outside the W&B run's folder: a job requeued after the
    time limit resumed it into a new W&B run and folder. Checkpoints record their run id; `last` continues it."""
    from test_cli_distributed import SLURM_ENV

    runs, job = tmp_path / "runs", tmp_path / "job"
    args = tiny_fit_args(runs, "--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(runs),
                         "--trainer.logger.init_args.offline", "true", "--trainer.limit_val_batches", "1",
                         "--data.limit", "320", "--trainer.default_root_dir", str(job),
                         "--ckpt_path", "last")  # fmt: skip
    env = {**wandb_env, **SLURM_ENV}
    r = run_cli(*args, "--trainer.max_epochs", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    [run] = list((runs / "gangen").iterdir())
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["gangen"]["wandb_run_id"] == run.name
    hpc = job / "hpc_ckpt_1.ckpt"  # as Lightning saves it on the requeue signal: after the epoch's last.ckpt
    job.mkdir(exist_ok=True)
    shutil.copyfile(last, hpc)
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {hpc} (W&B run {run.name}, which saved it)" in r.stdout
    assert [p.name for p in (runs / "gangen").iterdir()] == [run.name]  # no second run folder
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 10  # 5 + 5, in the run's own folder
    assert len(list((run / "wandb").glob(f"offline-run-*-{run.name}"))) == 2  # the same W&B run, resumed

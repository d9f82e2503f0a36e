"""Bad input: one line naming the value and the fix, exit status 2, nothing written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEMO_CONFIG, ROOT, assert_fit_refused, fails, run_cli

FIT_CASES = [
    (["--data.dataset", "imagenet"], ["'imagenet'", "fashion_mnist"]),
    (["--data.root", "/no/such/dir"], ["/no/such/dir", "--data.root", "apt-get install dataset-fashion-mnist"]),
    (["--model.generator.resolution", "48", "--model.discriminator.resolution", "48", "--data.resolution", "48"],
     ["resolution 48", "power of two"]),
    (["--model.generator.resolution", "512", "--model.discriminator.resolution", "512", "--data.resolution", "512"],
     ["resolution 512", "16, 32, 64, 128, 256"]),
    (["--model.generator.upsample", "pixel_shuffle"], ["'pixel_shuffle'", "'resize_conv'"]),
    (["--model.generator.norm", "instance"], ["'instance'", "'batch'"]),
    (["--model.discriminator.norm", "instance"], ["'instance'", "'spectral'"]),
    (["--model.loss", "wgan"], ["'wgan'", "'hinge'", "'wasserstein'"]),
    (["--data.resolution", "64"], ["data.resolution=64", "resolution=32"]),
    (["--model.discriminator.resolution", "64"], ["discriminator resolution=64"]),
    (["--data.channels", "3"], ["data.channels=3", "channels=1"]),
    (["--trainer.precision", "bf16-true", "--model.ema_kimg", "10"], ["bf16-true", "bf16-mixed", "--model.ema_kimg 0"]),
    (["--model.generator.num_classes", "5", "--model.discriminator.num_classes", "5"],
     ["conditional on 5 classes", "data has 10 classes", "--model.generator.num_classes 10"]),
]  # fmt: skip


@pytest.mark.parametrize("extra,needles", FIT_CASES, ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_fit_bad_input(capsys, tmp_path, extra, needles):
    assert_fit_refused(capsys, tmp_path, extra, needles)


def test_generate_num_samples(capsys, trained_ckpt, tmp_path):
    out = tmp_path / "g.png"
    for n in ("0", "-3"):
        line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", n, "--output", str(out))
        assert f"--num_samples {n} must be > 0" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "train-classifier", "generate"])
def test_unknown_option_of_a_command_is_one_line(capsys, tmp_path, command):
    """evaluate and train-classifier printed their whole usage (17-19 lines) for an unknown option."""
    source = (
        []
        if command == "train-classifier"
        else ["--samples" if command == "evaluate" else "--ckpt_path", str(tmp_path)]
    )
    output = tmp_path / ("x.json" if command == "evaluate" else "x")  # evaluate refuses other names up front
    line = fails(capsys, command, *source, "--output", str(output), "--bogus", "1")
    assert "unrecognized arguments: --bogus 1" in line and f"gangen {command}" in line and "--help" in line


def test_generate_missing_checkpoint(capsys, tmp_path):
    line = fails(capsys, "generate", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "g.png"))
    assert "nope.ckpt" in line and "not found" in line and "gangen fit" in line
    assert list(tmp_path.iterdir()) == []


def test_generate_corrupt_checkpoint(capsys, trained_ckpt, tmp_path):
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(trained_ckpt.read_bytes()[:5000])
    line = fails(capsys, "generate", "--ckpt_path", str(bad), "--output", str(tmp_path / "g.png"))
    assert "truncated.ckpt" in line and "could not be loaded" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.ckpt"]


def test_generate_not_a_gangen_checkpoint(capsys, tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    line = fails(capsys, "generate", "--ckpt_path", str(other), "--output", str(tmp_path / "g.png"))
    assert "not a gangen checkpoint" in line


@pytest.mark.parametrize("suffix,needle", [("out.gif", "end it with"), ("missing/g.png", "does not exist")])
def test_generate_bad_output(capsys, trained_ckpt, tmp_path, suffix, needle):
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--output", str(tmp_path / suffix))
    assert needle in line and suffix.split("/")[0] in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["", "x.png", "x.npz"])
def test_generate_empty_output_or_a_folder_with_a_file_name(capsys, trained_ckpt, tmp_path, monkeypatch, output):
    """An empty --output (an unset shell variable) wrote 64 PNGs into the current folder, exit 0; an existing
    folder named like a file (x.png) was filled with PNGs."""
    monkeypatch.chdir(tmp_path)
    if output:
        (tmp_path / output).mkdir()
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--output", output)
    assert (f"--output {output!r} is a folder: pass {output}/" if output else "--output '' is empty") in line
    assert [p.name for p in tmp_path.rglob("*")] == ([output] if output else [])


FIT_REFUSALS = [
    (["--trainer.logger.init_args.save_dir="], ["save_dir is empty", "pass a folder"]),  # was: a run in ./
    (["--data.limit", "640", "--trainer.val_check_interval", "1000"],  # were tracebacks once training began
     ["--trainer.val_check_interval 1000 is more than the 10 training batches", "at most 10",
      "check_val_every_n_epoch null"]),
    (["--trainer.val_check_interval", "0"], ["--trainer.val_check_interval 0 must be > 0"]),
    (["--trainer.check_val_every_n_epoch", "0"], ["--trainer.check_val_every_n_epoch 0 must be > 0 (epochs)"]),
    (["--model.g_optimizer.lr", "-1"], ["--model.g_optimizer was refused", "Invalid learning rate: -1.0"]),
    (["--model.d_optimizer.betas", "[0.5, 2.0]"], ["--model.d_optimizer was refused", "beta parameter at index 1"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "extra,needles", FIT_REFUSALS, ids=["empty_save_dir", "val_interval_over_epoch", "val_interval_0", "val_every_0",
                                        "negative_lr", "beta_2"]
)  # fmt: skip
def test_fit_settings_refused_before_anything_is_written(capsys, tmp_path, monkeypatch, extra, needles):
    monkeypatch.chdir(tmp_path)  # an empty save_dir would be this folder
    assert_fit_refused(capsys, tmp_path, extra, needles)


def test_validation_interval_across_epochs_is_not_refused(tmp_path):
    """With check_val_every_n_epoch null Lightning counts val_check_interval across epochs: 15 batches with
    10-batch epochs is allowed, and validation runs once in 20 batches, after the 15th."""
    r = run_cli("fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--data.limit", "640", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "15",
                "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (tmp_path / "dcgan_fashion_mnist" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = [row.split(",") for row in rows[1:] if row.split(",")[header.index("val/loss_d")]]
    assert [int(row[header.index("step")]) for row in validated] == [14]  # once, after the 15th of 20 (from 0)


def test_generate_folder_refuses_to_mix_runs(capsys, trained_ckpt, tmp_path):
    (tmp_path / "000000.png").write_bytes(b"x")
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "2", "--output", f"{tmp_path}/")
    assert "already holds PNG files" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png"]


@pytest.mark.parametrize(
    "option",
    ["--trainer.logger.init_args.save_dir", "--trainer.default_root_dir", "flush_logs_every_n_steps"],
)
def test_run_folders_that_cannot_be_made_are_one_line(capsys, tmp_path, option):
    """A file where a run folder should be (or a CSV logger flushing every 0 steps) was a traceback, exit 1,
    after the run had started (the flush one after metrics.csv, config.yaml and a grid were written)."""
    (tmp_path / "afile").write_text("x")
    extra = {
        "--trainer.logger.init_args.save_dir": [option, str(tmp_path / "afile" / "runs")],
        "--trainer.default_root_dir": ["--trainer.logger", "false", option, str(tmp_path / "afile" / "x")],
        "flush_logs_every_n_steps": ["--trainer.logger.init_args.flush_logs_every_n_steps", "0"],
    }[option]
    line = fails(capsys, "fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir",
                 str(tmp_path / "runs"), *extra)  # fmt: skip
    if option == "flush_logs_every_n_steps":
        assert line == "gangen: error: --trainer.logger.init_args.flush_logs_every_n_steps 0 must be >= 1"
    else:
        assert line.startswith(f"gangen: error: {option} {tmp_path / 'afile'}/")
        assert line.endswith(f"{tmp_path / 'afile'} is a file, so the folder cannot be made; choose another")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_unwritable_default_root_dir_is_fine_when_a_logger_has_the_run(tmp_path):
    """default_root_dir (the working directory unless set) holds nothing when a logger has the run folder:
    a read-only one (here /proc) must not stop the run."""
    from conftest import tiny_fit_args

    r = run_cli(*tiny_fit_args(tmp_path, "--trainer.default_root_dir", "/proc/gangen_x", "--trainer.max_steps", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model.generator.widht", "3"], "'widht' is not accepted"),  # unknown key
        (["--data.batch_size", "abc"], "abc"),  # wrong type
        (["--config", "missing.yaml"], "missing.yaml"),  # missing config file
    ],
)
def test_config_parse_errors_are_one_line(tmp_path, args, named):
    r = run_cli("fit", "--config", str(DEMO_CONFIG), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gangen: error: ") and named in lines[0], lines
    assert "gangen fit --help" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "args, final",
    [
        (["--trainer.devices", "two"], "gangen.errors.ConfigError: --trainer.devices 'two' is not a device count"),
        (["--model.generator.widht", "3"], 'argparse.ArgumentError: Parser key "model.generator":'),
    ],
    ids=["gangen_error", "parse_error"],
)
def test_gangen_debug_gives_the_traceback_and_keeps_the_exit_status(tmp_path, args, final):
    """GANGEN_DEBUG=1: the traceback, then the one `gangen: error:` line, and exit status 2 as without it
    (a bare `raise` made it 1, so a script checking for 2 saw another failure)."""
    r = run_cli("fit", "--config", str(DEMO_CONFIG), *args, cwd=tmp_path, env={"GANGEN_DEBUG": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback (most recent call last):" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("gangen: error: ")
    raised = [line for line in r.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception): ", line)]
    assert raised and raised[-1].startswith(final), raised  # the exception the one line names
    assert list(tmp_path.iterdir()) == []  # refused before anything is written, as without GANGEN_DEBUG


@pytest.mark.parametrize("debug", [None, "1"], ids=["plain", "GANGEN_DEBUG"])
def test_ctrl_c_in_a_command_exits_130_with_or_without_debug(tmp_path, debug):
    """Ctrl-C while `evaluate` reads its samples (here a FIFO no one writes: a hung file) exits 130, the
    shell's status for Ctrl-C; with GANGEN_DEBUG=1 after the traceback (it exited 1)."""
    samples = tmp_path / "samples"
    samples.mkdir()
    fifo = samples / "a.png"
    os.mkfifo(fifo)
    cmd = [sys.executable, str(ROOT / "cli.py"), "evaluate", "--samples", str(samples), "--data.dataset",
           "fashion_mnist", "--feature_extractor", "none.pt"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "GANGEN_DEBUG"} | ({"GANGEN_DEBUG": debug} if debug else {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:  # opening the FIFO for writing succeeds once evaluate has opened it to read
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        os.close(writer)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "gangen: interrupted"
    assert ("Traceback (most recent call last):" in err and "KeyboardInterrupt" in err) == bool(debug), err

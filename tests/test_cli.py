"""End to end through the CLI, as a user runs it: fit on real Fashion-MNIST -> checkpoint -> generate."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, assert_fit_refused, fails, run_cli, tiny_fit_args
from PIL import Image

from gangen import GAN, DCGANGenerator, generate, load_generator


def test_fit_writes_checkpoint_grids_and_metrics(trained_run):
    assert (trained_run / "config.yaml").is_file()
    samples = {p.name for p in (trained_run / "samples").glob("*.png")}
    assert {"kimg000000.png", "final.png"} <= samples
    with Image.open(trained_run / "samples" / "final.png") as im:
        assert im.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 fixed latents, 8 per row, 32 px + 2 px borders
    with open(trained_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss/d"]) for r in rows if r.get("loss/d")]
    assert losses and all(math.isfinite(x) for x in losses)
    val = [float(r["val/loss_d"]) for r in rows if r.get("val/loss_d")]
    assert len(val) == 2  # one validation per epoch
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["images_seen"] == 2 * 640  # 2 epochs of 10 batches of 64


def test_load_from_checkpoint_weights_only(trained_ckpt):
    model = GAN.load_from_checkpoint(trained_ckpt, weights_only=True, map_location="cpu")
    assert isinstance(model.generator, DCGANGenerator)
    assert model.generator.config["resolution"] == 32 and model.images_seen == 1280
    state = torch.load(trained_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.grid_z, state["grid_z"])  # fixed grid latents live in the checkpoint
    images = generate(model.generator, 5, seed=0)
    assert images.shape == (5, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    # the light loader used by `generate` gives the same generator
    assert torch.equal(images, generate(load_generator(trained_ckpt), 5, seed=0))


def test_generate_grid_folder_npz(trained_ckpt, tmp_path):
    grid = tmp_path / "grid.png"
    r = run_cli("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "64", "--output", str(grid))
    assert r.returncode == 0, r.stderr
    with Image.open(grid) as im:
        assert im.size == (274, 274) and im.mode == "L"

    folder = tmp_path / "pngs"
    r = run_cli("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "37", "--output", f"{folder}/")
    assert r.returncode == 0, r.stderr
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(37)]
    with Image.open(files[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"

    npz = tmp_path / "samples.npz"
    r = run_cli("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "300", "--output", str(npz),
                "--seed", "7", "--batch_size", "128")  # fmt: skip
    assert r.returncode == 0, r.stderr
    array = np.load(npz)["arr_0"]
    assert array.shape == (300, 32, 32, 1) and array.dtype == np.uint8
    assert array.std() > 1  # not blank
    # the PNG folder holds the same pixels as the npz for the same seed
    np.testing.assert_array_equal(np.asarray(Image.open(files[5])), _npz_for(trained_ckpt, tmp_path, 0, 37)[5, ..., 0])


def _npz_for(ckpt, tmp_path, seed, n):
    out = tmp_path / f"s{seed}_{n}.npz"
    r = run_cli(
        "generate", "--ckpt_path", str(ckpt), "--num_samples", str(n), "--seed", str(seed), "--output", str(out)
    )
    assert r.returncode == 0, r.stderr
    return np.load(out)["arr_0"]


def test_seed_reproducible(trained_ckpt, tmp_path):
    a, b, c = _npz_for(trained_ckpt, tmp_path, 1, 16), _npz_for(trained_ckpt, tmp_path / "..", 1, 16), None
    np.testing.assert_array_equal(a, b)
    c = _npz_for(trained_ckpt, tmp_path, 2, 16)
    assert not np.array_equal(a, c)


def test_interpolation_strip(trained_ckpt, tmp_path):
    out = tmp_path / "interp.png"
    r = run_cli("generate", "--ckpt_path", str(trained_ckpt), "--interpolate", "6", "--num_samples", "3",
                "--output", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.size == (6 * 34 + 2, 3 * 34 + 2)  # 3 strips of 6
        grid = np.asarray(im.convert("L"), dtype=np.int16)
    assert "wrote 18 images" in r.stdout
    for row in range(3):  # the images of a strip change from frame to frame: no two are the same
        frames = [grid[2 + 34 * row : 34 * (row + 1), 2 + 34 * k : 34 * (k + 1)] for k in range(6)]
        assert all(not np.array_equal(frames[i], frames[j]) for i in range(6) for j in range(i + 1, 6))


def test_validate_subcommand(trained_ckpt):
    common = ["validate", "--config", str(DEMO_CONFIG), "--trainer.logger", "false", "--trainer.limit_val_batches",
              "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    r = run_cli(*common, "--ckpt_path", str(trained_ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val/loss_d" in r.stdout and "gangen: warning" not in r.stderr
    r = run_cli(*common)  # untrained networks: allowed (a baseline), said (it was silent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val/loss_d" in r.stdout
    assert "gangen: warning: validate without --ckpt_path scores untrained networks: pass --ckpt_path last" in r.stderr


def test_print_config_with_overrides():
    r = run_cli("fit", "--config", str(DEMO_CONFIG), "--model.generator.base_channels", "48",
                "--data.batch_size", "96", "--trainer.max_epochs", "2", "--print_config")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "base_channels: 48" in r.stdout and "batch_size: 96" in r.stdout and "max_epochs: 2" in r.stdout


def test_help_lists_generate():
    r = run_cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "fit" in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0 and "--interpolate" in r.stdout


@pytest.mark.parametrize(
    "command, shown",
    [
        ("generate", ["--seed SEED latent seed (default 0)", "per forward pass (default 256)", "cuda:N (default cpu)"]),
        ("download-weights", ["seconds before giving up (default 30)"]),
    ],
)
def test_help_shows_the_defaults(capsys, command, shown):
    """`--help` left out the defaults of generate's --seed, --batch_size, --device and download-weights'
    --timeout: which seed a run without --seed used was nowhere to read."""
    from gangen.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines at the terminal's width
    for needle in shown:
        assert needle in text, (needle, text)


def test_generate_device_option(trained_ckpt, tmp_path):
    out = tmp_path / "g.png"
    r = run_cli("generate", "--ckpt_path", str(trained_ckpt), "--output", str(out), "--device", "cuda")
    if torch.cuda.is_available():
        assert r.returncode == 0 and out.is_file()
    else:
        assert r.returncode == 2 and "no CUDA device" in r.stderr and not out.exists()


def test_resume_continues_counting(trained_ckpt, tmp_path):
    from conftest import tiny_fit_args

    r = run_cli(*tiny_fit_args(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", str(trained_ckpt)))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["gangen"]["images_seen"] == 3 * 640  # one more epoch, counted on
    before = torch.load(trained_ckpt, weights_only=True)
    assert torch.equal(ckpt["state_dict"]["grid_z"], before["state_dict"]["grid_z"])  # same fixed latents


def test_resume_from_a_path_trains_what_is_configured_and_says_what_changed(trained_ckpt, tmp_path):
    """`fit --ckpt_path PATH`: the checkpoint's model settings fill in what the config leaves at its
    defaults, and the config files and the command line win (Lightning put the checkpoint's over them, so
    `--model.loss hinge` was dropped while config.yaml recorded the checkpoint's), and the optimizers train
    with the configured learning rate, not the one in their saved state. Every change is said on stdout."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    assert ckpt["hyper_parameters"]["loss"] == "non_saturating"
    ckpt["hyper_parameters"]["check_finite_every"] = 7  # as if trained with --model.check_finite_every 7
    edited = tmp_path / "trained.ckpt"
    torch.save(ckpt, edited)
    r = run_cli(*tiny_fit_args(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", str(edited),
                               "--model.loss", "hinge", "--model.g_optimizer.init_args.lr", "1e-4"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["loss"] == "hinge" and resumed["hyper_parameters"]["check_finite_every"] == 7
    g_lr, d_lr = (state["param_groups"][0]["lr"] for state in resumed["optimizer_states"])
    assert (g_lr, d_lr) == (1e-4, 2e-4)
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert config["loss"] == "hinge" and config["check_finite_every"] == 7
    assert config["g_optimizer"]["init_args"]["lr"] == 1e-4
    assert "gangen: resuming with model.loss 'hinge' as configured (checkpoint: 'non_saturating')" in r.stdout
    assert "gangen: resumed g_optimizer lr 0.0001 as configured (checkpoint: 0.0002)" in r.stdout
    assert "d_optimizer" not in r.stdout and "check_finite_every" not in r.stdout  # unchanged: not said


RESUME_REFUSED = [
    # settings the networks leave out of their specs when 0: compared at their defaults (was a state_dict traceback)
    (["--model.discriminator.dropout", "0.3"],
     ["discriminator dropout=0.0", "has 0.3", "--model.discriminator.dropout 0.0"]),
    (["--model.generator.num_classes", "10", "--model.discriminator.num_classes", "10"],
     ["generator num_classes=0", "--model.generator.num_classes 0"]),
    # a seed starts the random streams and the data order, which the checkpoint continues
    (["--model.seed", "5"], ["model.seed 0", "has 5", "--model.seed 0"]),
    (["--data.seed", "5"], ["data.seed 0", "has 5", "--data.seed 0"]),
]  # fmt: skip


@pytest.mark.parametrize("extra,needles", RESUME_REFUSED, ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_resume_with_another_network_or_seed_is_one_line(capsys, trained_ckpt, tmp_path, extra, needles):
    assert_fit_refused(capsys, tmp_path, ["--ckpt_path", str(trained_ckpt), *extra], needles)


def test_generator_export_or_missing_last_checkpoint_is_one_line(capsys, trained_ckpt, tmp_path):
    export = tmp_path / "out" / "g.safetensors"
    export.parent.mkdir()
    assert run_cli("export", "--ckpt_path", str(trained_ckpt), "--output", str(export)).returncode == 0
    for command in ("fit", "validate"):  # was KeyError 'pytorch-lightning_version' (and a run folder)
        line = fails(capsys, command, "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir",
                     str(tmp_path / "runs"), "--ckpt_path", str(export))  # fmt: skip
        assert "is a generator export" in line and "checkpoints/last.ckpt" in line
    # validate of `last` with none there: Lightning warned and validated freshly initialised weights
    line = fails(capsys, "validate", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir",
                 str(tmp_path / "runs"), "--ckpt_path", "last")  # fmt: skip
    assert "--ckpt_path last: no last.ckpt under" in line and "--ckpt_path PATH" in line
    assert not (tmp_path / "runs").exists()


def test_validate_last_finds_the_run_s_checkpoint(trained_run, tmp_path):
    r = run_cli("validate", "--config", str(DEMO_CONFIG), "--trainer.logger", "false", "--trainer.default_root_dir",
                str(trained_run.parent), "--ckpt_path", "last", "--trainer.limit_val_batches", "2",
                "--data.limit", "640", "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: validating {trained_run / 'checkpoints' / 'last.ckpt'}" in r.stdout


def test_resume_switching_ema_grid_optimizer_class_and_checkpoint_folder(trained_ckpt, tmp_path):
    """Each of these crashed the resume with a traceback: EMA switched on (missing generator_ema keys) or off
    (unexpected keys), another grid size (grid_z size mismatch), SGD -> Adam or Adam -> SGD (torch's
    load_state_dict: KeyError 'step' for SGD -> Adam). And `--ckpt_path last` now also looks in a configured
    ModelCheckpoint folder, where a SIGTERM save goes (it trained from scratch)."""
    folder = tmp_path / "ckpts"
    config = tmp_path / "ckpt_folder.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(folder), "save_last": True}}]}}))  # fmt: skip
    sgd = ["--model.g_optimizer", "torch.optim.SGD", "--model.g_optimizer.init_args.lr", "0.01",
           "--model.g_optimizer.init_args.momentum", "0.9"]  # fmt: skip
    r = run_cli(*tiny_fit_args(tmp_path / "a", "--config", str(config), "--ckpt_path", str(trained_ckpt),
                               "--trainer.max_epochs", "3", "--model.ema_kimg", "1", "--model.num_grid_samples", "16",
                               "--data.batch_size", "32", *sgd))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("gangen: the EMA generator starts from the checkpoint's generator (it had none)",
                 "gangen: the sample grid has 16 latents drawn from the seed (checkpoint: 64)",
                 "gangen: g_optimizer is SGD, the checkpoint's had other settings: its state starts fresh",
                 "gangen: resuming with data.batch_size 32 as configured (checkpoint: 64)"):  # fmt: skip
        assert line in r.stdout, (line, r.stdout[-3000:])
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["grid_z"].shape == (16, 100) and ckpt["gangen"]["images_seen"] == 3 * 640
    assert "momentum_buffer" in ckpt["optimizer_states"][0]["state"][0]  # SGD's state, trained on
    r = run_cli(*tiny_fit_args(tmp_path / "b", "--config", str(config), "--ckpt_path", "last",
                               "--trainer.max_epochs", "4", "--data.batch_size", "32"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {folder / 'last.ckpt'}" in r.stdout
    assert "gangen: the checkpoint's EMA generator is dropped (--model.ema_kimg 0)" in r.stdout
    assert "gangen: d_optimizer" not in r.stdout and "gangen: g_optimizer is Adam" in r.stdout
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert not any(k.startswith("generator_ema.") for k in ckpt["state_dict"])
    assert ckpt["gangen"]["images_seen"] == 4 * 640


def test_tensorboard_logger_gets_scalars_and_grids(tmp_path):
    from conftest import ROOT, tiny_fit_args
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = tiny_fit_args(tmp_path, "--config", str(ROOT / "configs" / "logger" / "tensorboard.yaml"),
                         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1")  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "tb" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert "samples" in events.Tags()["images"]
    grids = events.Images("samples")
    assert len(grids) == 2  # kimg 0 and the final grid
    assert (grids[-1].width, grids[-1].height) == (274, 274)
    assert "loss/d" in events.Tags()["scalars"] and "loss/g" in events.Tags()["scalars"]
    assert (run / "samples" / "final.png").is_file()


def test_model_and_data_seeds_may_differ(tmp_path):
    """GAN and ImageDataModule both take a `seed`; Lightning refuses differing shared hparams, so the data's
    stays out of the hparams (it is in config.yaml and in the checkpoint's training-order state)."""
    result = run_cli(*tiny_fit_args(tmp_path, "--model.seed", "1", "--data.seed", "2", "--trainer.max_epochs", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    assert "seed: 1" in (run / "hparams.yaml").read_text()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["seed"] == 1 and config["data"]["seed"] == 2

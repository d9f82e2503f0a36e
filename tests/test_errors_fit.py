"""fit's bad input that came out as a type dump, a traceback, or a run folder with nothing trained in it: one
line naming the value and the fix, exit status 2, nothing written (a CLI fuzz found each of these)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_fit_refused
from PIL import Image

TYPE_CASES = [  # jsonargparse's dump of every type it tried, squeezed onto one line and cut at 400 characters
    (["--trainer.precision", "8"], ["--trainer.precision 8 is not valid", "bf16-mixed", "32-true"]),
    (["--trainer.precision", "half"], ["--trainer.precision half is not valid", "16-mixed"]),
    (["--model.g_optimizer.lr", "fast"], ["--model.g_optimizer.lr fast is not valid: use a number"]),
    (["--model.d_optimizer", "torch.optim.Adamm"],
     ["--model.d_optimizer torch.optim.Adamm", "no attribute 'Adamm'", "e.g. torch.optim.Adam"]),
    (["--model.g_optimizer.betas", "[0.5]"], ["--model.g_optimizer.betas [0.5]", "tuple with 2 elements"]),
    (["--data.on_device", "gpu"], ["--data.on_device gpu is not valid: use true/false or auto"]),
    (["--seed_everything", "abc"], ["--seed_everything abc is not valid: use true/false or an integer"]),
    (["--data.batch_size", "x"], ["--data.batch_size x is not valid: use an integer"]),
    (["--trainer.callbacks.nrow", "4"],  # reaches the last callback listed, not SampleGrid
     ["--trainer.callbacks.nrow 4", "option 'nrow' is not accepted", "last callback listed (ModelCheckpoint)"]),
]  # fmt: skip


@pytest.mark.parametrize("extra,needles", TYPE_CASES, ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_a_value_of_the_wrong_type_names_the_option_and_what_it_takes(capsys, tmp_path, extra, needles):
    assert_fit_refused(capsys, tmp_path, extra, needles + ["(see `gangen fit --help`)"])


REFUSED = [
    # a callback that refuses a value while it is built: a 79-line traceback ending in the type dump
    (["--trainer.callbacks.every_n_epochs", "-3"], ["--trainer.callbacks", "every_n_epochs=-3", "Must be >= 0"]),
    (["--trainer.callbacks.every_n_train_steps", "-1"], ["--trainer.callbacks", "every_n_train_steps=-1"]),
    # devices Lightning refuses with a TypeError traceback (CPU) or a message without the value
    (["--trainer.devices", "-2"], ["--trainer.devices -2", "count >= 1", "auto"]),
    (["--trainer.devices", "0,1", "--trainer.accelerator", "cpu"],
     ["--trainer.devices 0,1 lists GPU indices", "--trainer.devices 2"]),
    # trained nothing, exited 0 and left config.yaml and hparams.yaml
    (["--trainer.max_steps", "0"], ["--trainer.max_steps 0 trains nothing", "-1"]),
    (["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"], ["--trainer.max_epochs 0 trains nothing"]),
    (["--trainer.limit_train_batches", "0"], ["--trainer.limit_train_batches 0 trains nothing"]),
    (["--trainer.limit_train_batches", "0.0"], ["--trainer.limit_train_batches 0.0 trains nothing"]),
    # seeds numpy, torch.Generator refuse: a ValueError traceback once the model or trainer was being built
    (["--seed_everything", str(10**23)], [f"--seed_everything {10**23} is out of range", "2**32 - 1"]),
    (["--seed_everything", "-1"], ["--seed_everything -1 is out of range"]),
    (["--model.seed", str(10**23)], [f"seed {10**23} is out of range: use -2**63 to 2**63 - 1"]),
    (["--model.seed", str(-(2**63) - 1)], [f"seed {-(2**63) - 1} is out of range"]),
    # widths whose weights alone outgrow any machine: torch's allocator traceback while the model was built
    (["--model.generator.latent_dim", str(10**8)],
     [f"DCGANGenerator(latent_dim={10**8}, base_channels=32, max_channels=512) has about 204.8 billion weights",
      "GiB of memory: lower latent_dim, base_channels or max_channels"]),
    (["--model.discriminator.base_channels", str(10**6), "--model.discriminator.max_channels", str(10**6)],
     ["DCGANDiscriminator(base_channels=1000000, max_channels=1000000)", "lower base_channels or max_channels"]),
]  # fmt: skip


@pytest.mark.parametrize("extra,needles", REFUSED, ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_refused_before_anything_is_written(capsys, tmp_path, extra, needles):
    (tmp_path / "runs").mkdir()
    assert_fit_refused(capsys, tmp_path / "runs", extra, needles)


def test_data_root_that_is_a_file_is_said_to_be_a_file(capsys, tmp_path):
    """It was reported as missing ("does not exist")."""
    gz = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    gz.parent.mkdir()
    gz.write_bytes(b"x")
    (tmp_path / "runs").mkdir()
    needles = [f"data root {gz} is a file, not a folder", f"e.g. {gz.parent}"]
    assert_fit_refused(capsys, tmp_path / "runs", ["--data.root", str(gz)], needles)


def flat_folder(tmp_path) -> Path:
    """An image folder without class subfolders: 8 grey 32x32 PNGs."""
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(8):
        Image.new("L", (32, 32), color=30 * i).save(root / f"{i}.png")
    return root


def test_conditional_model_on_an_unlabelled_folder_writes_nothing(capsys, tmp_path):
    """Refused before, but only once the data was set up: after config.yaml was written and the folder decoded
    into the cache."""
    root = flat_folder(tmp_path)
    (tmp_path / "runs").mkdir()
    extra = ["--data.dataset", "image_folder", "--data.root", str(root), "--data.batch_size", "4",
             "--data.cache_dir", str(tmp_path / "cache"), "--model.generator.num_classes", "10",
             "--model.discriminator.num_classes", "10"]  # fmt: skip
    needles = ["conditional on 10 classes but the data has no class labels", "num_classes 0"]
    assert_fit_refused(capsys, tmp_path / "runs", extra, needles)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("callback", ["ModelCheckpoint", "EarlyStopping"])
def test_a_metric_monitor_with_thinned_metrics_is_refused(capsys, tmp_path, inception_weights, callback):
    """Validations that every_kimg left without metrics handed the monitors the last value measured: checkpoints
    saved and named with an FID of kimg before, early stopping after one evaluation, a resume stopped by
    ModelCheckpoint's missing-key traceback (a metrics review found each)."""
    (tmp_path / "runs").mkdir()
    extra = ["--metrics.feature_extractor", "inception", "--metrics.inception_weights", str(inception_weights),
             "--metrics.every_kimg", "2", f"--trainer.callbacks+={callback}", "--trainer.callbacks.monitor",
             "metric/fid"]  # fmt: skip
    needles = [f"{callback} monitors 'metric/fid' at every validation, and --metrics.every_kimg 2 leaves",
               "--metrics.every_kimg 0 with --trainer.check_val_every_n_epoch N"]  # fmt: skip
    assert_fit_refused(capsys, tmp_path / "runs", extra, needles)


def test_metrics_with_validation_off_are_refused(capsys, tmp_path, inception_weights):
    """The metrics run at validations: with none, a run trained to its end without a single evaluation."""
    (tmp_path / "runs").mkdir()
    extra = ["--metrics.feature_extractor", "inception", "--metrics.inception_weights", str(inception_weights),
             "--trainer.limit_val_batches", "0"]  # fmt: skip
    needles = ["--metrics.feature_extractor inception evaluates at validations, and --trainer.limit_val_batches 0",
               "--trainer.limit_val_batches 1"]  # fmt: skip
    assert_fit_refused(capsys, tmp_path / "runs", extra, needles)


@pytest.mark.parametrize("under", [False, True])
def test_a_data_cache_dir_that_is_a_file_writes_nothing(capsys, tmp_path, under):
    """It was found at setup, after the run folder was written, and said to lack free space."""
    root = flat_folder(tmp_path)
    blocker = tmp_path / "cachefile"
    blocker.write_bytes(b"x")
    cache_dir = blocker / "sub" if under else blocker
    (tmp_path / "runs").mkdir()
    extra = ["--data.dataset", "image_folder", "--data.root", str(root), "--data.batch_size", "4",
             "--data.cache_dir", str(cache_dir)]  # fmt: skip
    what = f"is under the file {blocker}" if under else "is a file"
    needles = [f"--data.cache_dir {str(cache_dir)!r} {what}: pass a folder", "--data.cache false"]
    assert_fit_refused(capsys, tmp_path / "runs", extra, needles)


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
def test_damaged_weights_are_one_line_before_anything_is_written(capsys, tmp_path, trained_ckpt, option):
    """A checkpoint whose discriminator tensor does not fit its own recorded network (a damaged or foreign file):
    a size-mismatch traceback from load_state_dict, after config.yaml was written."""
    import torch

    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("discriminator.") and v.dim() == 4)
    ckpt["state_dict"][key] = ckpt["state_dict"][key][:1].clone()
    bad = tmp_path / "damaged.ckpt"
    torch.save(ckpt, bad)
    (tmp_path / "runs").mkdir()
    where = "checkpoint" if option == "--ckpt_path" else "init_from"
    needles = [f"{where} {bad}: its weights do not match its own network config", f"size mismatch for {key}: (1, ",
               "damaged or from another gangen version"]  # fmt: skip
    assert_fit_refused(capsys, tmp_path / "runs", [option, str(bad)], needles)

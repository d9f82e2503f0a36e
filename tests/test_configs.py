"""Every configs/*.yaml parses and instantiates (model, trainer, callbacks, logger; data where it exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, fails
from PIL import Image

from gangen.cli import GANCLI
from gangen.data import DEFAULT_FASHION_MNIST_ROOT, ImageDataModule
from gangen.errors import DataNotFoundError
from gangen.system import GAN

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LOGGER_CONFIGS = sorted((ROOT / "configs" / "logger").glob("*.yaml"))


@pytest.fixture(autouse=True)
def weights_env(inception_weights, monkeypatch):
    """Configs with FID on need Inception weights: the session's random-valued file stands in."""
    monkeypatch.setenv("GANGEN_INCEPTION_WEIGHTS", str(inception_weights))


def build(*args: str) -> GANCLI:
    return GANCLI(GAN, ImageDataModule, run=False, args=list(args), auto_configure_optimizers=False)


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"dcgan_fashion_mnist.yaml", "dcgan_mnist.yaml", "dcgan_cifar10.yaml", "dcgan_celeba64.yaml",
            "dcgan_image_folder.yaml", "sngan_fashion_mnist.yaml", "wgangp_fashion_mnist.yaml",
            "r1gan_fashion_mnist.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config: Path, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    res, ch = cfg["data"]["resolution"], cfg["data"]["channels"]
    # model, trainer and callbacks exactly as configured; data swapped for the real Fashion-MNIST files
    cli = build("--config", str(config), "--data.dataset", "fashion_mnist", "--data.root", DEFAULT_FASHION_MNIST_ROOT,
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.limit", "64")  # fmt: skip
    assert isinstance(cli.model, GAN)
    assert cli.model.generator.config["resolution"] == res == cli.model.discriminator.config["resolution"]
    assert cli.model.generator.config["channels"] == ch
    opt_g, opt_d = cli.model.configure_optimizers()
    assert opt_g.defaults["lr"] == cfg["model"]["g_optimizer"]["init_args"]["lr"]
    assert opt_d.defaults["betas"] == tuple(cfg["model"]["d_optimizer"]["init_args"]["betas"])
    assert any(type(cb).__name__ == "SampleGrid" for cb in cli.trainer.callbacks)
    assert cli.trainer.checkpoint_callback is not None
    assert not any(tmp_path.iterdir())  # instantiating writes nothing


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_data_section(config: Path, tmp_path):
    """The data section as written: loads where the files exist here, else a one-line error naming the path."""
    cfg = yaml.safe_load(config.read_text())["data"]
    if cfg["dataset"] in ("fashion_mnist", "mnist"):  # MNIST's IDX names are Fashion-MNIST's
        cli = build("--config", str(config), "--data.root", DEFAULT_FASHION_MNIST_ROOT, "--data.limit", "256")
    elif cfg["dataset"] == "image_folder":
        for i in range(3):
            Image.new("RGB", (80, 70), (40 * i, 20, 200)).save(tmp_path / f"{i}.jpg")
        cli = build("--config", str(config), "--data.root", str(tmp_path), "--data.batch_size", "2")
    else:  # cifar10 / celeba files are not on this machine and cannot be downloaded here
        missing = tmp_path / "absent"
        with pytest.raises(DataNotFoundError) as err:
            build("--config", str(config), "--data.root", str(missing))
        assert str(missing) in str(err.value) and "--data.download true" in str(err.value)
        assert "\n" not in str(err.value)
        return
    cli.datamodule.setup("fit")
    images, _ = next(iter(cli.datamodule.train_dataloader()))
    assert images.shape[1:] == (cfg["channels"], cfg["resolution"], cfg["resolution"])


@pytest.mark.parametrize("logger_config", LOGGER_CONFIGS, ids=lambda p: p.name)
def test_logger_configs_combine(logger_config: Path, tmp_path):
    cli = build("--config", str(ROOT / "configs" / "dcgan_fashion_mnist.yaml"), "--config", str(logger_config),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.limit", "64")  # fmt: skip
    expected = yaml.safe_load(logger_config.read_text())["trainer"]["logger"]["class_path"].rsplit(".", 1)[1]
    assert type(cli.trainer.logger).__name__ == expected


@pytest.mark.parametrize("config", [c for c in CONFIGS if "feature_extractor: inception" in c.read_text()], ids=str)
def test_fid_configs_without_weights_fail_before_training(config: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.delenv("GANGEN_INCEPTION_WEIGHTS")
    with pytest.raises(DataNotFoundError) as err:
        build("--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
              "--data.dataset", "fashion_mnist", "--data.root", DEFAULT_FASHION_MNIST_ROOT)  # fmt: skip
    message = str(err.value)
    assert "\n" not in message and "https://" in message and str(tmp_path / "torch") in message
    assert "download-weights" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", [c for c in CONFIGS if "monitor: metric/fid" in c.read_text()], ids=lambda p: p.name)
def test_monitor_of_a_metric_that_is_off_is_refused_before_training(config: Path, tmp_path, capsys):
    """The GPU configs keep the best checkpoint by metric/fid: with the metrics off, ModelCheckpoint used to
    stop the run with a traceback after its first epoch ("could not find the monitored key")."""
    line = fails(capsys, "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--data.dataset", "fashion_mnist", "--data.root", DEFAULT_FASHION_MNIST_ROOT,
                 "--metrics.feature_extractor", "none")  # fmt: skip
    assert "ModelCheckpoint monitors 'metric/fid', which --metrics.feature_extractor none never logs" in line
    assert "drop that callback" in line and not (tmp_path / "runs").exists()
    assert line.endswith("or use --metrics.feature_extractor inception for metric/fid")


def test_monitor_of_a_classifier_distance_names_a_classifier(tmp_path, capsys):
    """The refusal suggested Inception (metric/fid) for any monitored metric, also a classifier's FD."""
    line = fails(capsys, "fit", "--config", str(ROOT / "configs" / "dcgan_fashion_mnist.yaml"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                 "--trainer.callbacks.monitor", "metric/fd_clf", "--metrics.feature_extractor", "none")  # fmt: skip
    assert "EarlyStopping monitors 'metric/fd_clf'" in line
    assert line.endswith(
        "or use --metrics.feature_extractor a classifier file (gangen train-classifier) for metric/fd_clf"
    )
    assert not (tmp_path / "runs").exists()

"""The domain classifier behind metric/fd_<name>: trains on real labels, saves and loads safely."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from gangen.classifier import DomainClassifier, load_classifier, save_classifier, train_classifier
from gangen.data import ImageDataModule
from gangen.errors import ConfigError, DataNotFoundError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dm = ImageDataModule(limit=3000, batch_size=64, resolution=16)
    classifier, accuracy = train_classifier(dm, epochs=2, enable_progress_bar=False, accelerator="cpu")
    return classifier, accuracy


def test_learns_fashion_mnist_labels(trained):
    classifier, accuracy = trained
    assert accuracy > 0.6  # 10 classes: chance is 0.1
    assert classifier.features(torch.zeros(4, 1, 16, 16)).shape == (4, classifier.num_features)


def test_save_load_roundtrip(trained, tmp_path):
    classifier, accuracy = trained
    path = save_classifier(classifier, tmp_path / "c.pt", dataset="fashion_mnist", accuracy=accuracy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == classifier.config
    loaded, meta = load_classifier(path)
    assert meta["accuracy"] == accuracy
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.features(x), classifier.features(x))


def test_save_uses_its_own_temporary_file_and_leaves_none_after_a_failure(tmp_path, monkeypatch):
    """The temporary name was fixed (.c.pt.tmp): two train-classifier runs writing the same output wrote into
    one file and removed each other's; a file of that name (another writer's) was overwritten and deleted."""
    classifier = DomainClassifier(resolution=16)
    other = tmp_path / ".c.pt.tmp"  # another writer's, mid-write
    other.write_bytes(b"someone else's")
    real_save = torch.save

    def fail_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the file is there, half-way to being renamed into place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        save_classifier(classifier, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.pt.tmp"]  # nothing of ours left
    monkeypatch.setattr(torch, "save", real_save)
    save_classifier(classifier, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.pt.tmp", "c.pt"]
    assert other.read_bytes() == b"someone else's"
    assert load_classifier(tmp_path / "c.pt")[0].config == classifier.config


def test_load_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a gangen domain classifier"):
        load_classifier(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="could not be loaded safely"):
        load_classifier(tmp_path / "broken.pt")


def test_unlabelled_data_refused(tmp_path):
    from PIL import Image

    for i in range(8):
        Image.new("L", (20, 20), 30 * i).save(tmp_path / f"{i}.png")
    dm = ImageDataModule("image_folder", root=str(tmp_path), resolution=16, batch_size=4)
    with pytest.raises(ConfigError, match="no class labels"):
        train_classifier(dm, epochs=1)


def test_cli_train_classifier(tmp_path):
    out = tmp_path / "clf.pt"
    r = run_cli("train-classifier", "--data.limit", "512", "--data.batch_size", "64", "--data.resolution", "16",
                "--epochs", "1", "--accelerator", "cpu", "--output", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out accuracy" in r.stdout
    classifier, meta = load_classifier(out)
    assert isinstance(classifier, DomainClassifier) and meta["dataset"] == "fashion_mnist" and meta["resolution"] == 16

"""Bad metrics settings of `fit` (--metrics.*) and `evaluate`: one line naming the value and the fix, before
anything is written. Before, fit checked them at the first validation, after a whole epoch of training, and left
config.yaml, hparams.yaml and a sample grid behind (fuzz7 report, sections 5 and 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_fit_refused, fails

from gangen.errors import ConfigError
from gangen.inception import INCEPTION_FILENAME

# one epoch of 10 batches, then a validation of 2: where the old code first looked at the metrics settings
SMALL = ["--data.limit", "640", "--data.batch_size", "64", "--trainer.max_epochs", "1",
         "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--metrics.num_real", "0"], ["--metrics.num_real 0 must be >= 2 or null (the whole split)"]),
        (["--metrics.num_real", "1"], ["--metrics.num_real 1 must be >= 2"]),  # FID's covariance needs 2
        (["--metrics.batch_size", "0"], ["--metrics.batch_size 0 must be >= 1"]),
        (["--metrics.num_samples", "1"], ["--metrics.num_samples 1 must be >= 2"]),
        (["--metrics.every_kimg", "-1"], ["--metrics.every_kimg -1", "must be >= 0 (0: at every validation)"]),
        (["--metrics.seed", "-1"], ["--metrics.seed -1 is out of range: use 0 to 2**64 - 1"]),  # generate's range
    ],
)
def test_fit_refuses_metrics_counts_before_training(capsys, tmp_path, classifier_file, extra, needles):
    """num_real 0 named num_samples after an epoch; batch_size 0 was a DataLoader traceback after an epoch."""
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    metrics = ["--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "8",
               "--metrics.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert_fit_refused(capsys, save_dir, [*SMALL, *metrics, *extra], needles)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_fit_refuses_a_cache_dir_that_is_a_file(capsys, tmp_path, classifier_file, below):
    """A FileExistsError traceback after an epoch of training."""
    save_dir, file = tmp_path / "runs", tmp_path / "stats.pt"
    save_dir.mkdir()
    file.write_text("a file")
    cache_dir = file / below if below else file
    extra = ["--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "8",
             "--metrics.num_real", "8", "--metrics.cache_dir", str(cache_dir)]  # fmt: skip
    needles = [f"--metrics.cache_dir {cache_dir}", "is a file", "choose a folder"]
    assert_fit_refused(capsys, save_dir, [*SMALL, *extra], needles)
    assert file.read_text() == "a file"


def _wrong_shapes(path: Path) -> Path:
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    return path


def _text(path: Path) -> Path:
    path.write_text("not a weights file")
    return path


@pytest.mark.parametrize(
    "make, why", [(_text, "torch.load failed"), (_wrong_shapes, "tensors missing, e.g. Conv2d_1a_3x3.conv.weight")]
)
def test_fit_refuses_a_file_that_is_no_inception_state_dict(capsys, tmp_path, make, why):
    """An existing file that is no InceptionV3 state_dict was refused only when the extractor was built, at the
    first evaluation after an epoch of training (a missing file was refused up front)."""
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    weights = make(tmp_path / "weights.pth")
    extra = ["--metrics.feature_extractor", "inception", "--metrics.inception_weights", str(weights),
             "--metrics.num_samples", "8", "--metrics.num_real", "8",
             "--metrics.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    needles = [f"--metrics.inception_weights {weights} is not an InceptionV3 state_dict", why, INCEPTION_FILENAME]
    assert_fit_refused(capsys, save_dir, [*SMALL, *extra], needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "weights.pth"]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--device", "tpu"], ["--device 'tpu' is not a device name", "use cpu, cuda or cuda:N"]),  # was a traceback
        (["--batch_size", "0"], ["--batch_size 0 must be >= 1"]),  # was a DataLoader traceback
        (["--num_real", "0"], ["--num_real 0 must be >= 2 (or omit it: the whole split)"]),  # named num_samples
        (["--cache_dir", "FILE"], ["--cache_dir FILE is a file; choose a folder"]),  # was a FileExistsError
        (["--seed", "-1"], ["--seed -1 is out of range: use 0 to 2**64 - 1"]),  # generate refuses it
    ],
)
def test_evaluate_refuses_bad_values_in_one_line(capsys, tmp_path, classifier_file, extra, needles):
    samples, file = tmp_path / "s.npz", tmp_path / "stats.pt"
    np.savez(samples, np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8))
    file.write_text("a file")
    fill = {"FILE": str(file)}
    extra, needles = [fill.get(a, a) for a in extra], [n.replace("FILE", str(file)) for n in needles]
    args = ["evaluate", "--samples", str(samples), "--data.dataset", "fashion_mnist", "--data.limit", "640",
            "--feature_extractor", str(classifier_file), "--num_real", "8", "--cache_dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "m.json"), *extra]  # fmt: skip
    line = fails(capsys, *args)
    assert line.startswith("gangen: error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "stats.pt"]  # no m.json, no cache
    assert file.read_text() == "a file"


def test_real_statistics_refuses_one_sample_and_batch_size_zero(classifier_file):
    """One real image gave a NaN covariance (n - 1 = 0), cached; batch size 0 a RuntimeError from split()."""
    from gangen.classifier import ClassifierExtractor
    from gangen.metrics import real_statistics

    extractor, images = ClassifierExtractor(classifier_file), torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"num_samples 1 is invalid: use an integer >= 2"):
        real_statistics(images, extractor, num_samples=1, use_cache=False)
    with pytest.raises(ConfigError, match=r"batch_size 0 is invalid: use an integer >= 1"):
        real_statistics(images, extractor, batch_size=0, use_cache=False)

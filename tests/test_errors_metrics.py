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


def test_evaluate_more_samples_than_memory_holds_is_one_line_before_the_real_pass(
    capsys, tmp_path, classifier_file, trained_ckpt
):
    """evaluate holds every latent and feature at once: --num_samples 10**12 was an allocator traceback (or the
    kernel's kill) after the real images had gone through the extractor."""
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--feature_extractor", str(classifier_file),
                 "--num_samples", str(10**12), "--num_real", "8", "--cache_dir", str(tmp_path / "cache"),
                 "--output", str(tmp_path / "m.json"))  # fmt: skip
    start = f"gangen: error: --num_samples {10**12}: scoring holds every image's latent and features ("
    assert line.startswith(start), line
    assert "more than this machine's " in line and "images fit; 10000-50000 is usual)" in line, line
    assert list(tmp_path.iterdir()) == []  # no real statistics cached, no m.json


def test_evaluate_generator_refuses_more_samples_than_memory_holds(classifier_file, trained_ckpt):
    from gangen.classifier import ClassifierExtractor
    from gangen.metrics import evaluate_generator, real_statistics
    from gangen.sampling import load_generator, read_checkpoint

    generator = load_generator(read_checkpoint(str(trained_ckpt)), "cpu")
    extractor = ClassifierExtractor(classifier_file)
    noise = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real = real_statistics(noise, extractor, use_cache=False)
    with pytest.raises(ConfigError, match=r"^num_samples 1000000000000: scoring holds every image's latent"):
        evaluate_generator(generator, 10**12, real, extractor)


def test_evaluate_reads_16_bit_grey_samples_scaled_as_training_reads_them(tmp_path):
    """A folder of 16-bit grey PNGs was clipped at 255 (PIL's convert): nearly every pixel white."""
    from PIL import Image

    from gangen.commands import load_samples

    values = np.array([[0, 257, 40000, 65535]], dtype=np.uint16).repeat(4, axis=0)  # (4, 4)
    (tmp_path / "s").mkdir()
    Image.fromarray(values).save(tmp_path / "s" / "000000.png")
    assert Image.open(tmp_path / "s" / "000000.png").mode == "I;16"
    samples = load_samples(str(tmp_path / "s"))
    assert samples.shape == (1, 1, 4, 4) and samples.dtype == torch.uint8
    assert samples[0, 0, 0].tolist() == [0, 1, 156, 255]


def test_evaluate_samples_grey_palettes_count_as_grey(tmp_path):
    """A palette PNG of grey pixels (as PNG optimisers store grey images) next to "L" PNGs was refused as a
    grey+RGB mix: grey or RGB is decided once for the folder, a palette counts as grey when its pixels are, and
    beside an RGB image it is read as RGB. An RGB file stays RGB even when grey; a one-channel file beside a
    coloured one is still refused."""
    from PIL import Image

    from gangen.commands import load_samples

    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(ramp).convert("P").save(grey / "a.png")
    Image.fromarray(255 - ramp).save(grey / "b.png")
    assert [Image.open(grey / n).mode for n in ("a.png", "b.png")] == ["P", "L"]
    samples = load_samples(str(grey))
    assert samples.shape == (2, 1, 8, 8) and samples.dtype == torch.uint8
    assert samples[:, 0].tolist() == [ramp.tolist(), (255 - ramp).tolist()]
    rgb = tmp_path / "rgb"  # an RGB generator's samples that came out grey: still 3 channels
    rgb.mkdir()
    Image.fromarray(ramp).convert("RGB").save(rgb / "a.png")
    Image.fromarray(ramp).convert("P").save(rgb / "b.png")
    assert load_samples(str(rgb)).shape == (2, 3, 8, 8)

    colour = tmp_path / "colour"
    colour.mkdir()
    Image.fromarray(ramp).convert("P").save(colour / "a.png")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(colour / "b.png")
    samples = load_samples(str(colour))
    assert samples.shape == (2, 3, 8, 8)
    assert all(samples[0, c].tolist() == ramp.tolist() for c in range(3))
    assert samples[1, :, 0, 0].tolist() == [200, 10, 30]

    Image.new("RGB", (8, 8), (200, 10, 30)).convert("P").save(grey / "d.png")  # a palette of colour
    with pytest.raises(ConfigError) as info:
        load_samples(str(grey))
    assert str(info.value) == (
        f"samples {str(grey)!r}: d.png is 8x8 RGB and b.png 8x8 grey: every image must have one size and one "
        "colour mode (grey or RGB)"
    )


def test_evaluate_samples_of_mixed_sizes_are_one_line_naming_both(capsys, tmp_path, classifier_file):
    """Images of two sizes in one --samples folder were numpy's stack ValueError traceback."""
    from PIL import Image

    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("L", (32, 32)).save(folder / "000000.png")
    Image.new("RGB", (32, 32), (200, 10, 30)).save(folder / "000001.png")  # black RGB is grey: no mix
    line = fails(capsys, "evaluate", "--samples", str(folder), "--data.dataset", "fashion_mnist",
                 "--feature_extractor", str(classifier_file), "--output", str(tmp_path / "m.json"))  # fmt: skip
    assert line == (
        f"gangen: error: samples {str(folder)!r}: 000001.png is 32x32 RGB and 000000.png 32x32 grey: every image "
        "must have one size and one colour mode (grey or RGB)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]

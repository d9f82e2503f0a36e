"""Tests of gangen.metrics: parity with torch-fidelity on real Fashion-MNIST images, cache, weights, errors.

The real Inception weights cannot be downloaded here: every test uses the session's random-valued weights
file (conftest.inception_weights), which has the real architecture. Inception runs at 299 px on the CPU
(a few images per second), so each test sends as few images through it as its claim needs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from conftest import fails, file_server
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torchmetrics.image.fid import NoTrainInceptionV3

from gangen import decoded, inception, metrics
from gangen.data import DEFAULT_FASHION_MNIST_ROOT, ImageDataModule
from gangen.errors import ConfigError, DataNotFoundError
from gangen.metrics import Evaluator, RealStats, real_statistics
from gangen.networks import DCGANGenerator
from gangen.readers import read_idx, resize_images
from gangen.sampling import generate, to_uint8

FMNIST = Path(DEFAULT_FASHION_MNIST_ROOT)
N = 64  # images per side in the parity test
KID = dict(kid_subsets=20, kid_subset_size=48)  # subsets smaller than N, so the draws matter
ISC_SPLITS = 4
PAIRS = {  # gangen key -> torch-fidelity key
    "fid": "frechet_inception_distance",
    "kid_mean": "kernel_inception_distance_mean",
    "kid_std": "kernel_inception_distance_std",
    "is_mean": "inception_score_mean",
    "is_std": "inception_score_std",
}


def fmnist(split: str, n: int) -> torch.Tensor:
    """The first n images of a Fashion-MNIST split as RGB uint8 (n, 3, 32, 32)."""
    images = read_idx(FMNIST / f"{split}-images-idx3-ubyte.gz")[:n].unsqueeze(1)  # (n, 1, 28, 28)
    return resize_images(images, 32, 3)


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir()
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):  # (H, W, 3) uint8
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


class ForwardCounter:
    """Counts the Inception forward passes (and images) of an extractor while active."""

    def __init__(self, extractor: inception.InceptionExtractor) -> None:
        self.extractor, self.calls, self.images = extractor, 0, 0

    def __enter__(self) -> ForwardCounter:
        def hook(module, args, output):
            self.calls += 1
            self.images += len(args[0])

        self.handle = self.extractor.net.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def extractor(inception_weights) -> inception.InceptionExtractor:
    return inception.make_feature_extractor("inception", inception_weights)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """Real: the first N test images. Fake: the first N training images with noise (another distribution)."""
    return {"real": fmnist("t10k", N), "fake": add_noise(fmnist("train", N), 24.0)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_stats")


@pytest.fixture(scope="module")
def real_stats(extractor, images, cache_dir) -> RealStats:
    with ForwardCounter(extractor) as counter:
        stats = real_statistics(images["real"], extractor, dataset="parity", cache_dir=cache_dir, batch_size=24)
    assert not stats.from_cache and counter.images == N
    return stats


@pytest.fixture(scope="module")
def parity(extractor, images, real_stats, inception_weights, tmp_path_factory) -> dict[str, dict]:
    """gangen's and torch-fidelity's metrics of the same two image sets (torch-fidelity reads PNG folders)."""
    evaluator = Evaluator(extractor, real_stats, isc_splits=ISC_SPLITS, batch_size=20, **KID)
    evaluator.update(images["fake"][:30])  # two calls with uneven batches: the split must not matter
    evaluator.update(images["fake"][30:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = evaluator.compute()
    folder = tmp_path_factory.mktemp("parity")
    reference = torch_fidelity.calculate_metrics(
        input1=str(write_pngs(images["fake"], folder / "fake")),  # input1 = generated, as in gangen's draws
        input2=str(write_pngs(images["real"], folder / "real")),
        cuda=False, isc=True, fid=True, kid=True, verbose=False, cache=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(inception_weights), isc_splits=ISC_SPLITS, rng_seed=2020, **KID,
    )  # fmt: skip
    return {"ours": ours, "reference": reference, "warnings": [str(w.message) for w in caught]}


# ---------------------------------------------------------------- parity
def test_fid_kid_is_match_torch_fidelity(parity) -> None:
    ours, ref = parity["ours"], parity["reference"]
    print({k: (ours[k], ref[r]) for k, r in PAIRS.items()})  # shown with -s
    assert ours["fid"] > 1.0  # the two sets differ, so the relative tolerance below is meaningful
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    # same subsets as torch-fidelity; it computes the kernels in float32, we in float64
    assert ours["kid_mean"] > 3 * ours["kid_std"] > 0
    assert ours["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-3)
    # IS of the random weights is close to 1: compare its distance from 1 and the spread over splits
    assert ours["is_mean"] - 1 == pytest.approx(ref["inception_score_mean"] - 1, rel=1e-4)
    assert ours["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-4)


def test_result_carries_counts_weights_and_types(parity, inception_weights, extractor) -> None:
    ours = parity["ours"]
    assert ours["num_fake"] == N and ours["num_real"] == N and ours["kid_subset_size"] == KID["kid_subset_size"]
    assert ours["feature_extractor"] == "inception" and ours["weights"] == str(inception_weights)
    assert ours["weights_sha256_prefix"] == extractor.weights_sha256[:8] and len(extractor.weights_sha256) == 64
    assert all(type(ours[k]) is float for k in ("fid", "kid_mean", "kid_std", "is_mean", "is_std"))
    assert [m for m in parity["warnings"] if "biased" in m] == [
        f"FID from {N} generated / {N} real samples (< 2048) is biased: compare only values computed with the "
        "same sample counts"
    ]


def test_weights_load_in_torch_fidelity_and_torchmetrics(inception_weights, extractor, images) -> None:
    """The random file has the real layout (strict load), and torchmetrics' extractor gives our features."""
    batch = images["real"][:3]
    tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(inception_weights), antialias=False)
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(inception_weights))
    ours = extractor.features(batch)
    assert ours["pool"].shape == (3, 2048) and ours["logits"].shape == (3, 1008)
    assert ours["pool"].std() > 0.05  # He init: features are not ~1e-8, FIDs separate sets
    with torch.no_grad():
        torch.testing.assert_close(tm(batch), ours["pool"], rtol=0, atol=1e-5)
        torch.testing.assert_close(tf(batch)[0], ours["pool"], rtol=0, atol=1e-5)
    grey = extractor.features(batch[:, :1])  # greyscale input is repeated to RGB
    torch.testing.assert_close(grey["pool"], ours["pool"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- behaviour
def test_fid_zero_for_same_images_and_grows_with_noise(extractor, images, real_stats) -> None:
    base = images["real"][:32]
    key = {**real_stats.key, "num_samples": 32}
    stats = RealStats.from_features(real_stats.features[:32], key)  # statistics of `base`, no extra pass
    fids = []
    for sigma in (0.0, 16.0, 48.0, 128.0):
        evaluator = Evaluator(extractor, stats, batch_size=13, kid_subsets=5, kid_subset_size=16, isc_splits=2)
        evaluator.update(add_noise(base, sigma) if sigma else base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fids.append(evaluator.compute()["fid"])
    assert abs(fids[0]) < 1e-3, fids  # same images in other batches: same features
    assert fids[1] > 1e-2 and all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


def test_real_statistics_cache_hit_and_misses(extractor, images, real_stats, cache_dir) -> None:
    with ForwardCounter(extractor) as counter:
        again = real_statistics(images["real"], extractor, dataset="parity", cache_dir=cache_dir, batch_size=64)
    assert again.from_cache and counter.calls == 0  # no Inception pass over the real data
    torch.testing.assert_close(again.cov, real_stats.cov, rtol=0, atol=0)
    assert again.mean.dtype == again.cov.dtype == torch.float64 and again.cov.shape == (2048, 2048)
    assert again.features.shape == (N, 2048) and again.key == real_stats.key

    with ForwardCounter(extractor) as counter:  # another sample count is another key
        fewer = real_statistics(images["real"], extractor, dataset="parity", num_samples=5, cache_dir=cache_dir)
    assert not fewer.from_cache and counter.images == 5 and fewer.key["num_samples"] == 5
    torch.testing.assert_close(fewer.features, real_stats.features[:5], rtol=0, atol=1e-5)
    with ForwardCounter(extractor) as counter:  # another resolution too
        small = real_statistics(images["real"][:3, :, :16, :16], extractor, dataset="parity", cache_dir=cache_dir)
    assert not small.from_cache and counter.images == 3 and small.key["resolution"] == 16
    assert len(list(cache_dir.glob("*.pt"))) == 3 and not list(cache_dir.glob(".*"))  # no temporary leftovers

    other_weights = {**real_stats.key, "weights_sha256": "0" * 64}
    other_set = {**real_stats.key, "dataset": "cifar10"}
    names = {metrics.cache_file(k, cache_dir) for k in (real_stats.key, other_weights, other_set)}
    assert len(names) == 3 and metrics.cache_file(real_stats.key, cache_dir).is_file()


def test_num_real_above_the_split_says_it_uses_the_whole_split(extractor, images, tmp_path, monkeypatch) -> None:
    """It used all the images silently: an FID against fewer real images than configured."""
    monkeypatch.setenv(decoded.CACHE_ENV_VAR, str(tmp_path))
    dm = ImageDataModule(resolution=32, channels=1, limit=12, batch_size=4)
    with pytest.warns(UserWarning, match="^num_real 13 is more than the 12 images of the val split: using all 12$"):
        stats = real_statistics(dm, extractor, split="val", num_samples=13, batch_size=6)
    assert stats.key["num_samples"] == 12 and stats.features.shape == (12, 2048)
    with pytest.warns(UserWarning, match="^num_real 5 is more than the 4 images given: using all 4$"):
        real_statistics(images["real"][:4], extractor, num_samples=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly the split: no warning
        real_statistics(dm, extractor, split="val", num_samples=12, batch_size=6)


def test_cache_file_for_other_key_or_corrupt_is_recomputed(extractor, images, tmp_path) -> None:
    batch = images["real"][:2]
    stats = real_statistics(batch, extractor, dataset="tiny", cache_dir=tmp_path)
    path = metrics.cache_file(stats.key, tmp_path)
    path.write_bytes(b"truncated")
    with ForwardCounter(extractor) as counter:
        again = real_statistics(batch, extractor, dataset="tiny", cache_dir=tmp_path)
    assert not again.from_cache and counter.images == 2
    assert real_statistics(batch, extractor, dataset="tiny", cache_dir=tmp_path).from_cache  # rewritten


def test_tensor_source_key_holds_the_images(extractor, images, tmp_path) -> None:
    """Other images under the same name and count were handed the first set's cached statistics."""
    first, inverted = images["real"][:6], 255 - images["real"][:6]
    stats = real_statistics(first, extractor, dataset="mine", cache_dir=tmp_path)
    with ForwardCounter(extractor) as counter:
        other = real_statistics(inverted, extractor, dataset="mine", cache_dir=tmp_path)
    assert not other.from_cache and counter.images == 6
    fresh = real_statistics(inverted, extractor, use_cache=False)
    torch.testing.assert_close(other.mean, fresh.mean, rtol=0, atol=0)
    assert stats.key["images_sha256"] == hashlib.sha256(first.numpy().tobytes()).hexdigest()
    # the images used (the first num_samples) make the key: images after them do not
    longer = torch.cat([first, inverted])
    assert real_statistics(longer, extractor, dataset="mine", num_samples=6, cache_dir=tmp_path).from_cache
    assert real_statistics(first, extractor, dataset="mine", cache_dir=tmp_path).from_cache


def test_real_statistics_from_datamodule(extractor, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(decoded.CACHE_ENV_VAR, str(tmp_path))  # default cache dir: $GANGEN_CACHE_DIR/real_stats
    dm = ImageDataModule(resolution=32, channels=1, limit=50, batch_size=16)
    with ForwardCounter(extractor) as counter:
        stats = real_statistics(dm, extractor, split="val", num_samples=6, batch_size=4)
    assert counter.calls == 2 and stats.key["dataset"] == "fashion_mnist" and stats.key["channels"] == 1
    assert "images_sha256" not in stats.key  # a datamodule's key is its files': earlier caches stay valid
    spread = [200 * (j * 50 // 6) for j in range(6)]  # limit: every 200th of 10k; num_samples: 6 of those 50
    expected = resize_images(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[spread].unsqueeze(1), 32, 1)
    torch.testing.assert_close(stats.features, extractor.features(expected)["pool"], rtol=0, atol=1e-5)
    assert metrics.cache_file(stats.key).parent == tmp_path / "real_stats"
    with ForwardCounter(extractor) as counter:
        assert real_statistics(dm, extractor, split="val", num_samples=6).from_cache and counter.calls == 0
    (tmp_path / "copy").mkdir()  # the same files under another root: other files, other statistics
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / "copy" / f"{name}.gz").symlink_to(FMNIST / f"{name}.gz")
    elsewhere = ImageDataModule(root=str(tmp_path / "copy"), resolution=32, channels=1, limit=50, batch_size=16)
    other = real_statistics(elsewhere, extractor, split="val", num_samples=6)
    assert not other.from_cache and other.key["source_sha256"] != stats.key["source_sha256"]
    torch.testing.assert_close(other.features, stats.features, rtol=0, atol=0)
    # without --data.limit the same 6 are spread over all 10k: other images (the key had no limit, and a
    # later evaluation without the training run's limit was handed the limited run's statistics)
    whole = real_statistics(ImageDataModule(resolution=32, channels=1, batch_size=16), extractor, num_samples=6)
    assert not whole.from_cache and "data_limit" not in whole.key and stats.key["data_limit"] == 50
    spread = [10_000 * j // 6 for j in range(6)]
    expected = resize_images(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[spread].unsqueeze(1), 32, 1)
    torch.testing.assert_close(whole.features, extractor.features(expected)["pool"], rtol=0, atol=1e-5)


def test_real_statistics_of_a_sorted_folder_spread_over_it_and_follow_its_files(extractor, tmp_path) -> None:
    pictures = fmnist("t10k", 12)
    for i, image in enumerate(pictures.permute(0, 2, 3, 1).numpy()):  # 3 class folders of 4, sorted
        (tmp_path / "imgs" / f"class{i // 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"class{i // 4}" / f"{i:02d}.png")

    def stats() -> RealStats:
        dm = ImageDataModule(dataset="image_folder", root=str(tmp_path / "imgs"), resolution=32, channels=3,
                             batch_size=4, cache_dir=str(tmp_path / "decoded"))  # fmt: skip
        return real_statistics(dm, extractor, num_samples=6, cache_dir=tmp_path / "stats")

    first = stats()
    assert first.key["subset"] == "evenly spaced" and first.num_samples == 6
    expected = extractor.features(pictures[[0, 2, 4, 6, 8, 10]])["pool"]  # 2 of each class, not classes 0-1 only
    torch.testing.assert_close(first.features, expected, rtol=0, atol=1e-5)
    assert stats().from_cache
    edited = tmp_path / "imgs" / "class2" / "11.png"
    Image.fromarray(pictures[0].permute(1, 2, 0).numpy()).save(edited)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    again = stats()
    assert not again.from_cache and again.key["source_sha256"] != first.key["source_sha256"]


@pytest.mark.parametrize("on_device", [False, True])
def test_training_split_statistics_are_of_its_plain_images(extractor, tmp_path, on_device) -> None:
    """real_split train reads the split itself: not the training loader, whose flips, on-device batches (no
    dataset to read) and collectives under DDP (called by rank 0 alone) are the training's, and which replaced
    the datamodule's training sampler (its checkpointed position) when the statistics were computed."""
    dm = ImageDataModule(resolution=32, channels=3, batch_size=4, limit=24, hflip=True, on_device=on_device)
    stats = real_statistics(dm, extractor, split="train", num_samples=6, use_cache=False)
    images = dm._split("train").images[[0, 4, 8, 12, 16, 20]]  # evenly spaced, unflipped
    torch.testing.assert_close(stats.features, extractor.features(images)["pool"], rtol=0, atol=1e-5)
    assert dm._train_sampler is None  # the training order was not touched


def test_evaluate_generator_streams_batches(extractor) -> None:
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
    reference_images = torch.from_numpy(to_uint8(generate(generator, 8, seed=3))).permute(0, 3, 1, 2)
    stats = real_statistics(reference_images.flip(0)[:6], extractor, use_cache=False)
    options = dict(kid_subsets=3, kid_subset_size=4, isc_splits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ForwardCounter(extractor) as counter:
            streamed = metrics.evaluate_generator(generator, 8, stats, extractor, batch_size=3, seed=3, **options)
        evaluator = Evaluator(extractor, stats, **options)
        evaluator.update(reference_images)
        whole = evaluator.compute()
    assert counter.calls == 3 and streamed["num_fake"] == 8  # 3 + 3 + 2 images, never all at once
    assert streamed["fid"] == pytest.approx(whole["fid"], rel=1e-6, abs=1e-9)
    assert streamed["kid_mean"] == pytest.approx(whole["kid_mean"], rel=1e-6, abs=1e-12)


def test_sample_count_errors_and_clamping(extractor, real_stats) -> None:
    evaluator = Evaluator(extractor, real_stats)
    evaluator.update_features({"pool": real_stats.features[:1]})
    with pytest.raises(ConfigError, match="at least 2 samples on each side, got 1 generated and 64 real"):
        evaluator.compute()
    evaluator.update_features({"pool": real_stats.features[1:40]})  # 40 fake, default subset size 1000
    with pytest.warns(UserWarning) as caught:
        result = evaluator.compute()
    messages = [str(w.message) for w in caught]
    assert "KID subset size 1000 > 40 samples: using 40" in messages and result["kid_subset_size"] == 40
    assert "is_mean" not in result  # no logits given: no IS
    assert all("\n" not in m for m in messages)


def test_bad_images_are_refused(extractor, real_stats, images) -> None:
    evaluator = Evaluator(extractor, real_stats)
    with pytest.raises(ConfigError, match="uint8 images"):
        evaluator.update(images["real"][:2].float() / 127.5 - 1)
    with pytest.raises(ConfigError, match=r"do not match the real statistics' \(3, 32, 32\)"):
        evaluator.update(images["real"][:2, :, :16, :16])
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        evaluator.update(images["real"][:2, :2])
    foreign = RealStats.from_features(real_stats.features, {**real_stats.key, "weights_sha256": "f" * 64})
    with pytest.raises(ConfigError, match="recompute them with this extractor"):
        Evaluator(extractor, foreign)


# ---------------------------------------------------------------- weights resolution and download
def test_inception_url_is_torch_fidelity_s() -> None:
    assert inception.INCEPTION_URL == URL_INCEPTION_V3
    assert inception.INCEPTION_URL.endswith("/" + inception.INCEPTION_FILENAME)


def test_missing_weights_give_one_line_with_url_and_cache_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    with pytest.raises(DataNotFoundError) as err:
        inception.resolve_inception_weights(None)
    message = str(err.value)
    expected_cache = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert "\n" not in message and inception.INCEPTION_URL in message and str(expected_cache) in message
    assert "--metrics.inception_weights PATH" in message and "GANGEN_INCEPTION_WEIGHTS" in message
    assert "gangen download-weights" in message
    with pytest.raises(DataNotFoundError, match="Inception weights not found"):
        inception.make_feature_extractor("inception")


def test_weights_resolution_order(tmp_path, monkeypatch, inception_weights) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(inception.ENV_VAR, str(inception_weights))
    assert inception.resolve_inception_weights(None) == inception_weights
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(DataNotFoundError, match=f"'{missing}' \\(from inception_weights\\) not found"):
        inception.resolve_inception_weights(missing)  # an explicit path wins and must exist
    monkeypatch.setenv(inception.ENV_VAR, str(missing))
    with pytest.raises(DataNotFoundError, match=r"from \$GANGEN_INCEPTION_WEIGHTS"):
        inception.resolve_inception_weights(None)
    monkeypatch.delenv(inception.ENV_VAR)
    hub = inception.hub_cache_path()
    assert hub == tmp_path / "torch" / "hub" / "checkpoints" / inception.INCEPTION_FILENAME
    hub.parent.mkdir(parents=True)
    hub.symlink_to(inception_weights)
    assert inception.resolve_inception_weights(None) == hub
    with pytest.raises(ConfigError, match="is corrupt"):  # the official name with another file's hash
        inception.make_feature_extractor("inception")


def test_bad_weights_files_and_unknown_extractor(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not an InceptionV3 state_dict"):
        inception.make_feature_extractor("inception", text)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ConfigError, match="is not an InceptionV3 state_dict"):
        inception.make_feature_extractor("inception", wrong)
    with pytest.raises(ConfigError, match="unknown feature extractor 'vgg16': use one of inception"):
        inception.make_feature_extractor("vgg16")


def test_download_refused_leaves_nothing(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "weights" / inception.INCEPTION_FILENAME
    with pytest.raises(DataNotFoundError) as err:
        inception.download_inception_weights(dest, timeout=5, url=f"http://127.0.0.1:{port}/{dest.name}")
    assert "\n" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value) and "refused" in str(err.value)
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def weights_server(inception_weights):
    """The session's weights served on loopback as torch hub names files: <name>-<sha256 prefix>.pth, once under
    its own hash and once under a wrong one. Yields (good url, wrong-hash url, requests, sha256 hex)."""
    digest = _sha256(inception_weights)
    wrong = f"{(int(digest[:8], 16) + 1) % 16**8:08x}"
    good_name, bad_name = f"random-inception-{digest[:8]}.pth", f"random-inception-{wrong}.pth"
    with file_server({good_name: inception_weights, bad_name: inception_weights}) as (url, requests):
        yield f"{url}/{good_name}", f"{url}/{bad_name}", requests, digest


def test_download_is_byte_identical_kept_once_good_and_refused_when_corrupt(tmp_path, weights_server) -> None:
    good, bad, requests, digest = weights_server
    dest = tmp_path / "hub" / "checkpoints" / "w.pth"  # the folders do not exist yet
    assert inception.download_inception_weights(dest, url=good) == dest
    assert _sha256(dest) == digest and len(requests) == 1
    assert [p.name for p in dest.parent.iterdir()] == ["w.pth"]  # no temporary file left
    written = dest.stat().st_mtime_ns
    assert inception.download_inception_weights(dest, url=good) == dest  # a good file is kept: no request
    assert len(requests) == 1 and dest.stat().st_mtime_ns == written
    with open(dest, "r+b") as f:  # a damaged file (an interrupted copy) is fetched again
        f.truncate(1000)
    assert inception.download_inception_weights(dest, url=good) == dest
    assert _sha256(dest) == digest and len(requests) == 2
    corrupt = tmp_path / "corrupt" / "w.pth"
    with pytest.raises(ConfigError) as err:  # the bytes do not match the hash the name promises
        inception.download_inception_weights(corrupt, url=bad)
    assert str(err.value) == f"download of {bad} is corrupt (sha256 {digest[:12]}...): retry"
    assert len(requests) == 3 and list(corrupt.parent.iterdir()) == []
    missing = good.replace("random-inception-", "missing-")
    with pytest.raises(DataNotFoundError) as err:  # an HTTP error status
        inception.download_inception_weights(corrupt, url=missing)
    assert str(err.value).startswith(f"download of {missing} failed (File not found): check the network")
    assert list(corrupt.parent.iterdir()) == []


def test_download_weights_command(capsys, tmp_path, monkeypatch, weights_server) -> None:
    """`gangen download-weights` writes torch hub's cache file (or --dest) from the URL it names; here the URL
    is the loopback server's, as if it were the release URL."""
    from gangen.cli import main

    good, bad, requests, digest = weights_server
    download = inception.download_inception_weights
    defaults = download.__defaults__  # (dest, timeout, url): url's default is the release URL
    monkeypatch.setattr(download, "__defaults__", (*defaults[:-1], good))
    monkeypatch.setattr(inception, "INCEPTION_URL", good)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    main(["download-weights"])
    hub = tmp_path / "torch" / "hub" / "checkpoints" / inception.INCEPTION_FILENAME
    assert capsys.readouterr().out == f"downloaded {good} to {hub}\n"
    assert _sha256(hub) == digest and len(requests) == 1
    main(["download-weights", "--dest", str(tmp_path / "w.pth"), "--timeout", "5"])
    assert capsys.readouterr().out == f"downloaded {good} to {tmp_path / 'w.pth'}\n"
    assert _sha256(tmp_path / "w.pth") == digest and len(requests) == 2
    monkeypatch.setattr(download, "__defaults__", (*defaults[:-1], bad))
    line = fails(capsys, "download-weights", "--dest", str(tmp_path / "corrupt" / "w.pth"))
    assert line == f"gangen: error: download of {bad} is corrupt (sha256 {digest[:12]}...): retry"
    assert list((tmp_path / "corrupt").iterdir()) == []


def test_moments_match_numpy_cov() -> None:
    features = torch.rand(50, 7, generator=torch.Generator().manual_seed(0)) + 3  # offset: cancellation check
    stats = RealStats.from_features(features, {})
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(stats.mean.numpy(), features.double().mean(0).numpy(), rtol=1e-12)

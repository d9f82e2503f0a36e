"""FID, KID and IS of generated images, TTUR / torch-fidelity compatible, with cached real statistics.

Pieces, in the order a caller uses them:
- `resolve_inception_weights(path)` and `make_feature_extractor("inception", weights)` (gangen/inception.py,
  also importable from here): the weights file and one extractor shared by all three metrics, so every
  image goes through Inception once; uint8 images (N, C, H, W) -> "pool" (FID / KID) and "logits" (IS).
- `real_statistics(datamodule or images, extractor, ...)`: float64 mean / covariance plus the pool features
  (KID needs the samples, not moments) of the real images, cached on disk and loaded without any Inception
  pass when the key (dataset, split, resolution, channels, sample count, extractor, weights sha256) matches.
- `Evaluator(extractor, real)`: `update(fake uint8 images)` in batches, `compute()` -> dict of floats with
  the sample counts and the weights used. `evaluate_generator(...)` streams a generator through it.

Choices (checked against the torchmetrics 1.9 and torch-fidelity 0.4 sources):
- Extractor: torch-fidelity's `FeatureExtractorInceptionV3` (registered as "inception-v3-compat"). It is the
  network torch-fidelity runs and the base class of torchmetrics' `NoTrainInceptionV3`: uint8 -> float32,
  TF1-compatible bilinear resize to 299 without antialias (torchmetrics >= 1.8 antialiases by default, which
  changes FID), (x - 128) / 128. Its public forward returns all requested features of one pass ("2048" and
  "logits_unbiased"); `NoTrainInceptionV3.forward` returns only the first, and getting both from it would
  need its private `_torch_fidelity_forward`. Two deliberate departures, both at float32 rounding level
  (features within ~1e-6, FID within 1e-5 relative of torch-fidelity's): the network runs channels_last
  (1.45x faster on CPU), and TF32 is off on CUDA (cuDNN runs float32 convolutions as TF32 by default).
- Statistics are our own small code, not torchmetrics' metric classes: `KernelInceptionDistance` and
  `InceptionScore` draw subsets / shuffles from the global torch RNG (not seedable per call, not
  torch-fidelity's numpy draws), and IS there uses float32 softmax and an unbiased std; KID and IS here
  reproduce torch-fidelity's `RandomState(seed)` draws exactly, in float64. `FrechetInceptionDistance`
  would be exact, but it keeps real and fake sums in the same synced state, so real statistics loaded from
  the cache on every DDP rank would be summed world_size times. FID = ||mu1 - mu2||^2 + tr(S1 + S2 -
  2 sqrt(S1 S2)) with the trace from the eigenvalues of S1 S2, as TTUR / torch-fidelity / torchmetrics.
- KID subset size larger than a sample count is clamped to the smaller count, with a one-line warning
  (torch-fidelity refuses); IS splits likewise. FID below 2 samples is a ConfigError; below 2048 a warning.
- Extraction and statistics run under no_grad with autocast disabled, in float32 features and float64
  sums, whatever precision the training loop uses. InceptionExtractor is a plain object holding the
  network, so kept on a LightningModule it is no submodule: precision plugins never convert it.

DDP (later): the fake-side state is reducible as is: `_Moments` holds float64 sum (D,), sum of outer
products (D, D) and the count, to be `all_reduce(SUM)`-ed; the KID features and IS logits are lists
of (B, D) tensors to be all-gathered (padded to equal length). Real statistics are identical on every rank
(each loads the cache file, rank 0 writes it) and are never reduced. Generated counts per rank must add up
to exactly N, with per-rank seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gangen.cache_dir import not_a_folder, touch
from gangen.decoded import DECODER_VERSION, cache_root
from gangen.errors import ConfigError
from gangen.inception import FeatureExtractor, check_uint8
from gangen.sampling import atomic_file, generate, latents, to_uint8

MIN_UNBIASED_SAMPLES = 2048  # below this (the feature dimension) FID is visibly biased by the sample count


# ---------------------------------------------------------------- statistics
class _Moments:
    """float64 sums over feature rows: enough for mean and covariance, and all-reducible under DDP."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)
        self.count = 0

    def update(self, features: Tensor) -> None:
        f = features.double()  # (B, D)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += len(f)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean (D,) and unbiased covariance (D, D), float64 on the CPU (np.cov's normalisation)."""
        n = self.count
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean.cpu(), cov.cpu()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), float64 on the CPU, as TTUR / torch-fidelity."""
    mu1, sigma1, mu2, sigma2 = (t.detach().to("cpu", torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    tr_covmean = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()  # complex128 sqrt, like np
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def kernel_inception_distance(
    fake: Tensor, real: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """Mean and std over subsets of the unbiased MMD^2 with kernel (x.y / D + 1)^3, float64.

    Subsets are drawn as torch-fidelity draws them (numpy RandomState(seed): fake, then real, per subset).
    """
    rng = np.random.RandomState(seed)
    fake, real = fake.double(), real.to(fake.device, torch.float64)
    m, dim = subset_size, fake.shape[1]
    mmds = []
    for _ in range(subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), m, replace=False)).to(fake.device)]  # (m, D)
        y = real[torch.from_numpy(rng.choice(len(real), m, replace=False)).to(fake.device)]  # (m, D)
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # (m, m) each
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        mmds.append(float(within - 2 * k_xy.sum() / m**2))
    return float(np.mean(mmds)), float(np.std(mmds))


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Mean and std over `splits` of exp(E KL(p(y|x) || p(y))), float64, torch-fidelity's shuffle and splits."""
    n = len(logits)
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(logits.device)].double()
    p, log_p = logits.softmax(1), logits.log_softmax(1)  # (N, K)
    scores = []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits : (i + 1) * n // splits], log_p[i * n // splits : (i + 1) * n // splits]
        kl = (chunk * (log_chunk - chunk.mean(0, keepdim=True).log())).sum(1)  # (n / splits,)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- real statistics, cached on disk
@dataclass
class RealStats:
    """Statistics of real images for one key: float64 mean / covariance and the pool features (for KID)."""

    mean: Tensor  # (D,) float64
    cov: Tensor  # (D, D) float64
    features: Tensor  # (N, D) float32, all real samples (KID draws subsets from them)
    key: dict  # dataset, split, resolution, channels, num_samples, feature_extractor, weights_sha256
    from_cache: bool = field(default=False, compare=False)

    @property
    def num_samples(self) -> int:
        return len(self.features)

    @classmethod
    def from_features(cls, features: Tensor, key: dict) -> RealStats:
        """Statistics of already extracted pool features (N, D), e.g. gathered from several processes."""
        moments = _Moments(features.shape[1], features.device)
        moments.update(features)
        return cls(*moments.mean_cov(), features.float().cpu(), key)


def default_cache_dir() -> Path:
    """$GANGEN_CACHE_DIR/real_stats, else ~/.cache/gangen/real_stats."""
    return cache_root() / "real_stats"


def check_cache_dir(cache_dir: str | Path | None, option: str) -> None:
    """ConfigError when the statistics could never be written to `cache_dir`: empty, or it (or a folder above it)
    is a file. A read-only folder passes: statistics cached there by someone else are still read."""
    if cache_dir is None:
        return
    if str(cache_dir) == "":
        raise ConfigError(f"{option} '' is empty: pass a folder, or null for the default ({default_cache_dir()})")
    blocker = not_a_folder(cache_dir)
    if blocker is not None and blocker == Path(cache_dir).expanduser().absolute():
        raise ConfigError(f"{option} {cache_dir} is a file; choose a folder")
    if blocker is not None:
        raise ConfigError(f"{option} {cache_dir}: {blocker} is a file, so the folder cannot be made; choose a folder")


def cache_file(key: dict, cache_dir: str | Path | None = None) -> Path:
    """The cache file of a key: readable prefix + hash of the whole key (so any field change misses)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key["dataset"]))[-40:]
    name = f"{slug}-{key['split']}-{key['resolution']}px-{key['channels']}ch-n{key['num_samples']}-{digest}.pt"
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / name


def _batches(
    source: object, split: str, num_samples: int | None, batch_size: int
) -> tuple[str, Iterator[Tensor], int, dict]:
    """(dataset id, uint8 batches (B, C, R, R), count, what else identifies the images) of a datamodule split
    (`num_samples` evenly spaced over it) or a uint8 tensor (its first `num_samples`)."""
    from torch.utils.data import DataLoader, Subset

    from gangen.data import _FILE_DATASETS, ImageDataModule, evenly_spaced
    from gangen.readers import collate

    if isinstance(source, Tensor):
        images = check_uint8(source)[:num_samples]
        return "", iter(images.split(batch_size)), len(images), {}
    if not isinstance(source, ImageDataModule):
        raise ConfigError(f"real images come from an ImageDataModule or a uint8 tensor, not {type(source).__name__}")
    if split not in ("train", "val"):
        raise ConfigError(f"split {split!r} is invalid: use 'train' or 'val'")
    source.setup("fit" if split == "train" else "validate")
    dataset = source._split(split)  # the images themselves: not the training loader (flips, sampler, collectives)
    keep = evenly_spaced(len(dataset), num_samples)  # spread: a class-sorted folder keeps every class
    subset = dataset if keep is None else Subset(dataset, keep)
    loader = DataLoader(  # an own generator: an iterator draws its worker seed from it, not torch's global stream
        subset, batch_size=batch_size, collate_fn=collate, num_workers=source.num_workers,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    name = source.dataset
    if name == "image_folder":
        name = f"image_folder:{Path(source.root).resolve()}"
    elif name == "lsun":
        name = "lsun:" + ",".join(source.lsun_classes)
    identity: dict[str, Any] = {}
    if keep is not None:
        identity["subset"] = "evenly spaced"  # which images, beyond how many (older versions took the first N)
    if source.dataset in _FILE_DATASETS:  # PIL-decoded pixels: a decoder change gives new statistics
        identity["decoder"] = DECODER_VERSION
    if source.limit is not None and len(dataset) == source.limit:  # cut to --data.limit first: other images
        identity["data_limit"] = source.limit
    files = source.source_stats(split)  # other files, or edited ones, get new statistics
    identity["source_sha256"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return name, (_from_float(images) for images, _ in loader), len(subset), identity


def _from_float(images: Tensor) -> Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, C, H, W), clamped and rounded by sampling.to_uint8."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)


def real_statistics(
    source: object,
    extractor: FeatureExtractor,
    *,
    dataset: str | None = None,
    split: str = "val",
    num_samples: int | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> RealStats:
    """Statistics of `num_samples` (None = all) real images, from the cache file when it exists.

    `source`: an ImageDataModule (its `split`, "val" = the held-out split; `num_samples` images evenly spaced
    over it, so a class-sorted image folder keeps every class) or uint8 images (N, C, H, W; the first
    `num_samples`); `dataset` names a tensor source in the cache key (without it a tensor source is not
    cached), next to a sha256 of the images used. The key also holds a datamodule's source files (paths,
    sizes, mtimes). The cache lives in `cache_dir` (default: default_cache_dir()); a hit runs no extractor pass
    at all.
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
        raise ConfigError(f"num_samples {num_samples!r} is invalid: use an integer >= 2 (FID needs 2) or None (all)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size {batch_size!r} is invalid: use an integer >= 1")
    name, batches, count, identity = _batches(source, split, num_samples, batch_size)
    if isinstance(source, Tensor) and dataset:  # the name alone handed other images the first set's statistics
        identity["images_sha256"] = images_sha256(source[:count])
    if num_samples is not None and num_samples > count:  # an FID protocol other than the one asked for
        where = "given" if isinstance(source, Tensor) else f"of the {split} split"
        message = f"num_real {num_samples} is more than the {count} images {where}: using all {count}"
        warnings.warn(message, stacklevel=2)
    first = next(batches, None)
    if first is None:
        raise ConfigError(f"no real images to compute statistics from (num_samples={num_samples!r})")
    key = dict(
        dataset=dataset or name, split=split, resolution=first.shape[-1], channels=first.shape[1],
        num_samples=count, feature_extractor=extractor.name, weights_sha256=extractor.weights_sha256, **identity,
    )  # fmt: skip
    path = cache_file(key, cache_dir) if use_cache and key["dataset"] else None
    if path is not None and path.is_file():
        stats = _load(path, key)
        if stats is not None:
            return stats
    with torch.autocast(extractor.device.type, enabled=False):
        features = torch.cat([extractor.features(images)["pool"] for images in itertools.chain([first], batches)])
        stats = RealStats.from_features(features, key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"key": key, "mean": stats.mean, "cov": stats.cov, "features": stats.features}
        atomic_file(path, lambda tmp: torch.save(payload, tmp))
    return stats


def images_sha256(images: Tensor) -> str:
    """sha256 of uint8 images' bytes in (N, C, H, W) order (0.06 s for 10k 3x64x64 images on a 2-core CPU)."""
    return hashlib.sha256(images.detach().cpu().contiguous().numpy()).hexdigest()


def _load(path: Path, key: dict) -> RealStats | None:
    """The cached statistics, or None when the file is unreadable or was written for another key."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign file: recompute and overwrite
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    touch(path)  # last used now (`gangen cache --clean --unused_days D`)
    return RealStats(payload["mean"], payload["cov"], payload["features"], key, from_cache=True)


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """FID, KID and IS of generated images against fixed real statistics (reset keeps the real side).

    Feed generated uint8 images (N, C, H, W) with `update` (any number of calls, split into `batch_size`
    chunks), then `compute()`. Keys: fid, kid_mean, kid_std, is_mean, is_std (for an extractor other than
    Inception: `<name>`, `<name>_kid_mean`, ... so a domain-classifier distance is never reported as FID),
    plus num_fake, num_real, the draws (kid_subsets, kid_subset_size, isc_splits as used, kid_is_seed: `seed`),
    feature_extractor, weights, weights_sha256_prefix.
    Defaults are torch-fidelity's (kid_subsets=100, kid_subset_size=1000, isc_splits=10, seed=2020).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        real: RealStats,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        seed: int = 2020,
        batch_size: int = 64,
    ) -> None:
        if real.key.get("weights_sha256") != extractor.weights_sha256 or real.key.get("feature_extractor") != (
            extractor.name
        ):
            raise ConfigError(
                f"real statistics were computed with {real.key.get('feature_extractor')} weights "
                f"{str(real.key.get('weights_sha256'))[:8]}, not {extractor.name} {extractor.weights_sha256[:8]}: "
                "recompute them with this extractor"
            )
        for name, value in (("kid_subsets", kid_subsets), ("kid_subset_size", kid_subset_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} {value!r} is invalid: use an integer >= 1")
        if not isinstance(isc_splits, int) or isc_splits < 1 or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"isc_splits {isc_splits!r} and batch_size {batch_size!r} must be integers >= 1")
        self.extractor, self.real = extractor, real
        self.kid_subsets, self.kid_subset_size, self.isc_splits = kid_subsets, kid_subset_size, isc_splits
        self.seed, self.batch_size = seed, batch_size
        self.reset()

    def reset(self) -> None:
        """Forget the generated samples; the real statistics stay (reset_real_features=False)."""
        self._moments: _Moments | None = None
        self._pool: list[Tensor] = []  # (B, D) float32 on the CPU, for KID
        self._logits: list[Tensor] = []  # (B, K) float32 on the CPU, for IS

    @property
    def num_fake(self) -> int:
        return self._moments.count if self._moments is not None else 0

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """ConfigError unless generated images of `shape` (C, H, W) have the real images' channels and size."""
        key = self.real.key
        if tuple(shape) != (key["channels"], key["resolution"], key["resolution"]):
            raise ConfigError(
                f"generated images {tuple(shape)} do not match the real statistics' "
                f"({key['channels']}, {key['resolution']}, {key['resolution']}): use the data's resolution/channels"
            )

    def update(self, images: Tensor) -> None:
        """Add generated uint8 images (N, C, R, R) at the real images' channels and resolution."""
        self.check_shape(check_uint8(images).shape[1:])
        for chunk in images.split(self.batch_size):
            self.update_features(self.extractor.features(chunk))

    @torch.no_grad()
    def update_features(self, features: dict[str, Tensor]) -> None:
        """Add one batch of extractor outputs ({"pool": (B, D), optional "logits": (B, K)})."""
        pool = features["pool"]
        with torch.autocast(pool.device.type, enabled=False):
            if self._moments is None:
                self._moments = _Moments(pool.shape[1], pool.device)
            self._moments.update(pool)
        self._pool.append(pool.float().cpu())
        if "logits" in features:
            self._logits.append(features["logits"].float().cpu())

    def compute(self) -> dict[str, float | int | str]:
        """All metrics as python floats, with the sample counts and the weights file used."""
        n_fake, n_real = self.num_fake, self.real.num_samples
        if n_fake < 2 or n_real < 2:
            raise ConfigError(
                f"FID needs at least 2 samples on each side, got {n_fake} generated and {n_real} real: "
                "raise the number of samples"
            )
        if min(n_fake, n_real) < MIN_UNBIASED_SAMPLES:
            what = "FID" if self.extractor.name == "inception" else f"FD ({self.extractor.name} features)"
            warnings.warn(
                f"{what} from {n_fake} generated / {n_real} real samples (< {MIN_UNBIASED_SAMPLES}) is biased: "
                "compare only values computed with the same sample counts",
                stacklevel=2,
            )
        subset = _clamped("KID subset size", self.kid_subset_size, min(n_fake, n_real))
        name = self.extractor.name
        fd, prefix = ("fid", "") if name == "inception" else (name, f"{name}_")
        mean, cov = self._moments.mean_cov()
        out: dict[str, float | int | str] = {fd: frechet_distance(mean, cov, self.real.mean, self.real.cov)}
        device = self.extractor.device
        fake = torch.cat(self._pool).to(device)
        out[f"{prefix}kid_mean"], out[f"{prefix}kid_std"] = kernel_inception_distance(
            fake, self.real.features, self.kid_subsets, subset, self.seed
        )
        draws: dict[str, int] = {"kid_subsets": self.kid_subsets, "kid_subset_size": subset}
        if self._logits:
            draws["isc_splits"] = splits = _clamped("IS splits", self.isc_splits, n_fake)
            out[f"{prefix}is_mean"], out[f"{prefix}is_std"] = inception_score(
                torch.cat(self._logits).to(device), splits, self.seed
            )
        return {
            **out,
            "num_fake": n_fake,
            "num_real": n_real,
            **draws,
            "kid_is_seed": self.seed,  # the KID subsets' and IS splits' draws
            "feature_extractor": name,
            "weights": str(self.extractor.weights),
            "weights_sha256_prefix": self.extractor.weights_sha256[:8],
        }


def _clamped(what: str, value: int, limit: int) -> int:
    if value > limit:
        warnings.warn(f"{what} {value} > {limit} samples: using {limit}", stacklevel=3)
    return min(value, limit)


def evaluate_generator(
    generator: nn.Module,
    num_samples: int,
    real: RealStats,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    seed: int = 0,
    **evaluator_options: int,
) -> dict[str, float | int | str]:
    """Metrics of `num_samples` images generated from latents(num_samples, seed), batch by batch.

    Images are generated with sampling.generate and converted with sampling.to_uint8 (clamp + round) one
    batch at a time, so only the features are held. `evaluator_options` go to Evaluator. The results name
    `seed` latent_seed.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples {num_samples!r} must be an integer >= 1")
    check_evaluate_memory(generator.latent_dim, {}, num_samples)  # the latents alone, before they are drawn
    evaluator = Evaluator(extractor, real, batch_size=batch_size, **evaluator_options)
    z = latents(num_samples, generator.latent_dim, seed)  # (N, latent_dim)

    def check_first(features: dict[str, Tensor]) -> None:  # with the features, after the first batch
        check_evaluate_memory(generator.latent_dim, _widths(features), num_samples)

    features = generated_features(
        generator, z, extractor, batch_size, check_shape=evaluator.check_shape, check_features=check_first
    )
    evaluator.update_features(features)
    return {**evaluator.compute(), "latent_seed": seed}


def check_evaluate_memory(
    latent_dim: int, widths: dict[str, int], num_samples: int, option: str = "num_samples"
) -> None:
    """ConfigError when scoring `num_samples` generated images cannot fit in the memory this process may use: the
    latents (float32) and every feature of every image (`widths`, e.g. {"pool": 2048, "logits": 1008}; float32,
    twice: gathered per batch, then joined for KID and IS) are held at once. A lower bound: only what cannot fit
    is refused (it was an allocator traceback, or the kernel killing the process, after the real images' pass)."""
    from gangen.cache_dir import human, usable_memory

    usable = usable_memory()
    per_image = 4 * latent_dim + 2 * 4 * sum(widths.values())
    if usable is None or num_samples * per_image <= usable[0]:
        return
    held = "latent and features (" + ", ".join(f"{k} {w}" for k, w in widths.items()) + ")" if widths else "latent"
    raise ConfigError(
        f"{option} {num_samples}: scoring holds every image's {held} in memory, about "
        f"{human(num_samples * per_image)}, more than {usable[1]}: lower it (at most about "
        f"{usable[0] // per_image} images fit; 10000-50000 is usual)"
    )


def feature_widths(generator: nn.Module, extractor: FeatureExtractor) -> dict[str, int]:
    """The extractor's feature sizes per image ({"pool": 2048, "logits": 1008}), from one generated image."""
    image = _from_float(generate(generator, 1, seed=0, check_finite=False))  # (1, C, H, W) uint8
    return _widths(extractor.features(image))


def _widths(features: dict[str, Tensor]) -> dict[str, int]:
    """Values per image of each extractor output ({"pool": (B, 2048), ...} -> {"pool": 2048, ...})."""
    return {key: value[0].numel() for key, value in features.items()}


def generated_features(
    generator: nn.Module,
    z: Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    label_offset: int = 0,
    check_shape: Callable[[tuple[int, ...]], None] | None = None,
    check_features: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """Extractor features of generator(z), one batch at a time: {"pool": (N, D), ...} on the extractor's device.

    Each batch is generated (sampling.generate, eval mode) and converted to uint8 by clamping and rounding
    (sampling.to_uint8), so only features are held, never the images. A conditional generator's image i gets
    class (label_offset + i) % num_classes (label_offset: the index of z[0] in the whole evaluated set).
    `check_shape`: called with the first batch's (C, H, W) (Evaluator.check_shape: another size scored silently);
    `check_features`: with the first batch's features.
    """
    chunks: dict[str, list[Tensor]] = {}
    for start in range(0, len(z), batch_size):
        zb = z[start : start + batch_size]  # (B, latent_dim)
        images = generate(
            generator, len(zb), z=zb, batch_size=batch_size, label_offset=label_offset + start, check_finite=False
        )  # training's own check stops all ranks; load_generator checks files
        if start == 0 and check_shape is not None:
            check_shape(tuple(images.shape[1:]))
        features = extractor.features(_from_float(images))
        if start == 0 and check_features is not None:
            check_features(features)
        for key, value in features.items():
            chunks.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in chunks.items()}

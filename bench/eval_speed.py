"""Time a FID + KID + IS evaluation: gangen.metrics against torch_fidelity.calculate_metrics, same images.

Real images: the first N Fashion-MNIST test images; "generated": the first N training images with noise;
both 32x32 RGB uint8, in memory. Both tools run the same Inception weights (--weights; default: a random
file with the real architecture, written to a temp folder, since the real one cannot be downloaded here).

Rows: gangen with an empty real-statistics cache (real + generated images through Inception), gangen with
the cache filled (generated only: the situation at every evaluation during training), torch-fidelity (real
+ generated). Inception at 299 px dominates; a 2-core CPU runs a few images/s, so use --num_samples to keep
the run short: the 10k column extrapolates the measured Inception throughput and adds the statistics
(FID / KID / IS maths) timed on 10k random features of the same shape.

    python bench/eval_speed.py --num_samples 256            # a few minutes on 2 cores
    python bench/eval_speed.py --num_samples 10000 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from gangen import inception, metrics
from gangen.data import DEFAULT_FASHION_MNIST_ROOT
from gangen.readers import read_idx, resize_images

TARGET = 10_000  # the sample count the extrapolation is for


class Images(Dataset):
    """uint8 (3, H, W) images from one tensor, the input torch-fidelity takes besides folders."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def image_sets(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) uint8 (n, 3, 32, 32): Fashion-MNIST test images, training images + N(0, 24^2) noise."""
    root = Path(DEFAULT_FASHION_MNIST_ROOT)
    real = resize_images(read_idx(root / "t10k-images-idx3-ubyte.gz")[:n].unsqueeze(1), 32, 3)
    fake = resize_images(read_idx(root / "train-images-idx3-ubyte.gz")[:n].unsqueeze(1), 32, 3)
    noise = torch.randn(fake.shape, generator=torch.Generator().manual_seed(0)) * 24
    return real, (fake.float() + noise).round().clamp(0, 255).to(torch.uint8)


def run_gangen(real, fake, weights, cache_dir, args) -> tuple[dict, dict[str, float]]:
    """Metrics and phase times (load, real, fake, stats) of one gangen evaluation."""
    times, start = {}, time.perf_counter()
    extractor = inception.make_feature_extractor("inception", weights, args.device)
    times["load"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = metrics.real_statistics(real, extractor, dataset="bench", cache_dir=cache_dir, batch_size=args.batch_size)
    times["real"] = time.perf_counter() - start
    evaluator = metrics.Evaluator(extractor, stats, kid_subset_size=min(1000, len(fake)), batch_size=args.batch_size)
    start = time.perf_counter()
    evaluator.update(fake)
    sync(args.device)
    times["fake"] = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluator.compute()
    times["stats"] = time.perf_counter() - start
    return result, times


def run_torch_fidelity(real, fake, weights, args) -> tuple[dict, float]:
    start = time.perf_counter()
    result = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), cuda=args.device == "cuda", batch_size=args.batch_size,
        fid=True, kid=True, isc=True, kid_subset_size=min(1000, len(fake)), verbose=False, cache=False,
        feature_extractor_weights_path=str(weights),
    )  # fmt: skip
    return result, time.perf_counter() - start


def stats_times(n: int, device: str) -> tuple[float, float]:
    """Seconds of the FID + KID + IS maths on n random samples: (gangen, torch-fidelity)."""
    gen = torch.Generator().manual_seed(0)
    fake, real = torch.rand(n, 2048, generator=gen) * 0.5, torch.rand(n, 2048, generator=gen) * 0.5
    logits = torch.randn(n, 1008, generator=gen)
    subset = min(1000, n)
    start = time.perf_counter()
    real_stats = metrics.RealStats.from_features(real.to(device), {})
    fake_stats = metrics.RealStats.from_features(fake.to(device), {})
    metrics.frechet_distance(fake_stats.mean, fake_stats.cov, real_stats.mean, real_stats.cov)
    metrics.kernel_inception_distance(fake.to(device), real, subset_size=subset)
    metrics.inception_score(logits.to(device))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    stats = [fid_features_to_statistics(f) for f in (fake, real)]
    fid_statistics_to_metric(*stats, verbose=False)
    kid_features_to_metric(fake, real, kid_subset_size=subset, verbose=False)
    isc_features_to_metric(logits)
    return ours, time.perf_counter() - start


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=TARGET, help="generated and real images (<= 10000)")
    parser.add_argument("--weights", type=Path, default=None, help="Inception weights (default: random file)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception batch (both tools)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    n = args.num_samples
    if not 2 <= n <= 10_000:
        parser.error("--num_samples must be in [2, 10000] (the Fashion-MNIST test split)")
    warnings.filterwarnings("ignore", message=".*(biased|KID subset|IS splits).*")
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # torch-fidelity's 4 workers
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or inception.write_random_inception_weights(Path(tmp) / "random-inception.pth")
        real, fake = image_sets(n)
        print(f"{n} generated + {n} real 32x32 images, weights {weights}, device {args.device}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        cold, cold_t = run_gangen(real, fake, weights, Path(tmp) / "cache", args)
        warm, warm_t = run_gangen(real, fake, weights, Path(tmp) / "cache", args)
        reference, tf_seconds = run_torch_fidelity(real, fake, weights, args)
    ours_stats_n, tf_stats_n = stats_times(n, args.device)
    ours_stats_10k, tf_stats_10k = stats_times(TARGET, args.device)

    def row(name: str, seconds: float, inception_images: int, stats_n: float, stats_10k: float) -> str:
        at_10k = (seconds - stats_n) * TARGET / n + stats_10k  # Inception part scales with n
        return f"{name:<28} {seconds:9.1f} {n / seconds:11.2f} {inception_images / seconds:15.2f} {at_10k:11.0f}"

    cold_s, warm_s = sum(cold_t.values()), sum(warm_t.values())
    print(f"\n{'':<28} {'seconds':>9} {'samples/s':>11} {'Inception img/s':>15} {'10k est. s':>11}")
    print(row("gangen (cold real cache)", cold_s, 2 * n, ours_stats_n, ours_stats_10k))
    print(row("gangen (real stats cached)", warm_s, n, ours_stats_n, ours_stats_10k))
    print(row("torch-fidelity", tf_seconds, 2 * n, tf_stats_n, tf_stats_10k))
    print(f"ratio torch-fidelity / gangen: {tf_seconds / cold_s:.2f} (cold), {tf_seconds / warm_s:.2f} (cached)")
    print("gangen phases (cold): " + ", ".join(f"{k} {v:.1f}s" for k, v in cold_t.items()))
    print(f"statistics only (FID+KID+IS maths): n={n}: gangen {ours_stats_n:.1f}s, torch-fidelity {tf_stats_n:.1f}s; "
          f"n={TARGET}: gangen {ours_stats_10k:.1f}s, torch-fidelity {tf_stats_10k:.1f}s")  # fmt: skip
    keys = {"fid": "frechet_inception_distance", "kid_mean": "kernel_inception_distance_mean",
            "is_mean": "inception_score_mean"}  # fmt: skip
    for key, ref_key in keys.items():
        print(f"{key:>9}: gangen {cold[key]:.7g} (cached {warm[key]:.7g}), torch-fidelity {reference[ref_key]:.7g}")
    rel = abs(cold["fid"] - reference["frechet_inception_distance"]) / abs(reference["frechet_inception_distance"])
    # on CUDA an H100 gave 1.4e-4 on 10k images, most likely torch-fidelity's TF32 convolutions (cuDNN's
    # default; gangen's Inception turns TF32 off)
    tolerance = 1e-4 if args.device == "cpu" else 1e-3
    print(f"FID relative difference {rel:.1e} (tolerance {tolerance:g})")
    assert rel <= tolerance, "FID differs"


if __name__ == "__main__":
    main()

"""Sample quality at equal images seen: the paper DCGAN config against the recommended config.

    python bench/quality.py --classifier clf.pt --out runs/quality --kimg 600 --every_kimg 60 \
        --run dcgan_fashion_mnist:0 --run sngan_fashion_mnist:0 --run sngan_fashion_mnist:1

Each --run CONFIG:SEED is a real `gangen fit` of configs/CONFIG.yaml (subprocess, one torch thread each,
all runs in parallel) for --kimg thousand images, with the domain Frechet distance (a classifier from
`gangen train-classifier`, metric/fd_<stem>) of --num_samples generated images (the EMA generator where the
config has one) against the held-out split every --every_kimg. Runs that already finished (metrics.jsonl
complete) are only re-read. Prints each curve (kimg -> FD), the best and final FD, the final grid path, and
checks the issue's bar: every recommended run ends at least --factor times below the best FD of any
baseline (dcgan_*) run, and ends within 1.5x of its own best (no late collapse).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 60_000  # Fashion-MNIST's training split


def fit_args(config: str, seed: int, args: argparse.Namespace) -> list[str]:
    batches = int(args.every_kimg * 1000 / args.batch_size)  # validation (and FD) every every_kimg
    total_batches = int(args.kimg * 1000 / args.batch_size)
    return [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--seed_everything", str(seed), "--model.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.name", f"{config}_s{seed}",
        "--trainer.logger.init_args.version", "0",
        "--trainer.max_epochs", "-1", "--trainer.max_steps", str(2 * total_batches),  # 2 optimizer steps a batch
        "--trainer.val_check_interval", str(batches), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", str(args.batch_size),
        "--metrics.feature_extractor", str(args.classifier), "--metrics.num_samples", str(args.num_samples),
        "--metrics.cache_dir", str(args.out / "cache"),
    ]  # fmt: skip


def read_curve(run: Path) -> list[tuple[float, float]]:
    """(kimg, FD) pairs from a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["kimg"], r[r["feature_extractor"]]) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", type=Path, required=True, help="domain classifier (.pt) for the FD")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="folder for the runs")
    p.add_argument("--run", action="append", default=[], help="CONFIG:SEED, repeatable")
    p.add_argument("--kimg", type=float, default=600, help="thousands of images per run")
    p.add_argument("--every_kimg", type=float, default=60, help="FD every this many thousand images")
    p.add_argument("--num_samples", type=int, default=5000, help="generated images per FD")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--factor", type=float, default=3.0, help="required ratio best baseline FD / final FD")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.run or ["dcgan_fashion_mnist:0"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    procs = []
    expected = int(args.kimg // args.every_kimg)
    for config, seed in runs:
        run = args.out / f"{config}_s{seed}" / "version_0"
        if len(read_curve(run)) >= expected and (run / "samples" / "final.png").is_file():
            continue  # finished earlier
        log = open(args.out / f"{config}_s{seed}.log", "w")
        procs.append(subprocess.Popen(fit_args(config, seed, args), cwd=ROOT, env=env, stdout=log, stderr=log))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        sys.exit(f"runs failed (see the .log files in {args.out}): {failed}")

    summary = {}
    for config, seed in runs:
        run = args.out / f"{config}_s{seed}" / "version_0"
        curve = read_curve(run)
        best, final = min(fd for _, fd in curve), curve[-1][1]
        summary[(config, seed)] = (best, final)
        points = "  ".join(f"{k:.0f}:{fd:.2f}" for k, fd in curve)
        print(f"{config} seed {seed}: kimg:FD  {points}")
        print(f"  best {best:.2f}  final {final:.2f}  grid {run / 'samples' / 'final.png'}")
    baseline = [v[0] for (c, _), v in summary.items() if c.startswith("dcgan")]
    if baseline:
        bar = min(baseline) / args.factor
        for (config, seed), (best, final) in summary.items():
            if not config.startswith("dcgan"):
                ok = final <= bar and final <= 1.5 * best
                print(f"{config} seed {seed}: final {final:.2f} vs bar {bar:.2f} (best baseline / {args.factor:g}), "
                      f"final/best {final / best:.2f}: {'PASS' if ok else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()

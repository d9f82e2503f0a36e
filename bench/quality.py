"""Sample quality at equal images seen: the paper DCGAN config against the recommended config.

    python bench/quality.py --classifier clf.pt --out runs/quality --kimg 320 --every_kimg 32 \
        --run dcgan_fashion_mnist:0 --run sngan_fashion_mnist:0 --run sngan_fashion_mnist:1

Each --run CONFIG:SEED is a real `gangen fit` of configs/CONFIG.yaml (subprocess, --threads torch threads
each, all runs in parallel) for --kimg thousand images, saving a checkpoint every --every_kimg. Every
checkpoint is then scored with the domain Frechet distance (a classifier from `gangen train-classifier`) of
--num_samples generated images (the EMA generator where the run has one, as `gangen evaluate` does) against
the 10k held-out images; scores go to <run>/fd.jsonl. `--phase eval` only scores (checkpoints already
scored are skipped), so it can follow the training while it runs, and the classifier can arrive late.
Prints each curve (kimg -> FD), best and final FD, the final grid, and checks the issue's bar: every
recommended run ends at least --factor times below the best FD of any baseline (dcgan_*) run, and ends within
1.5x of its own best FD (no late collapse).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gangen, not an installed one

CALLBACKS = """trainer:
  callbacks:
    - class_path: gangen.callbacks.SampleGrid
      init_args: {{every_kimg: {every_kimg}}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: {steps}
        every_n_epochs: null
        save_last: true
        save_top_k: -1
        filename: kimg{{progress/kimg:07.1f}}
        auto_insert_metric_name: false
"""


def run_dir(args: argparse.Namespace, config: str, seed: int) -> Path:
    return args.out / f"{config}_s{seed}" / "version_0"


def fit_command(config: str, seed: int, args: argparse.Namespace) -> list[str]:
    batches = round(args.every_kimg * 1000 / args.batch_size)  # a checkpoint every every_kimg
    total = round(args.kimg * 1000 / args.batch_size)
    extra = args.out / f"callbacks_{batches}.yaml"
    extra.write_text(CALLBACKS.format(every_kimg=args.every_kimg, steps=2 * batches))  # 2 optimizer steps a batch
    return [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--config", str(extra), "--seed_everything", str(seed), "--model.seed", str(seed),
        "--data.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.name", f"{config}_s{seed}",
        "--trainer.logger.init_args.version", "0", "--trainer.max_epochs", "-1", "--trainer.max_steps",
        str(2 * total), "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", str(args.batch_size), "--metrics.feature_extractor", "none",
    ]  # fmt: skip


def train(args: argparse.Namespace, runs: list[tuple[str, int]]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    procs = []
    for config, seed in runs:
        if (run_dir(args, config, seed) / "samples" / "final.png").is_file():
            continue  # finished earlier
        log = open(args.out / f"{config}_s{seed}.log", "w")
        procs.append(subprocess.Popen(fit_command(config, seed, args), cwd=ROOT, env=env, stdout=log, stderr=log))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        sys.exit(f"runs failed (see the .log files in {args.out}): {failed}")


def score(args: argparse.Namespace, runs: list[tuple[str, int]]) -> None:
    """FD of every checkpoint not yet in <run>/fd.jsonl."""
    import torch

    from gangen.data import ImageDataModule
    from gangen.inception import make_feature_extractor
    from gangen.metrics import evaluate_generator, real_statistics
    from gangen.sampling import load_generator, read_checkpoint

    torch.set_num_threads(args.threads)
    extractor = make_feature_extractor(str(args.classifier))
    data = ImageDataModule(dataset="fashion_mnist", resolution=32, channels=1, batch_size=256)
    real = real_statistics(data, extractor, split="val", batch_size=256, cache_dir=args.out / "cache")
    for config, seed in runs:
        run = run_dir(args, config, seed)
        done = {row["ckpt"] for row in read_rows(run)}
        for ckpt in sorted((run / "checkpoints").glob("kimg*.ckpt")):
            if ckpt.name in done:
                continue
            state = read_checkpoint(ckpt)
            results = evaluate_generator(load_generator(state), args.num_samples, real, extractor, 256, seed=0)
            row = {"ckpt": ckpt.name, "kimg": state["gangen"]["images_seen"] / 1000,
                   "ema": any(k.startswith("generator_ema.") for k in state["state_dict"]), **results}  # fmt: skip
            with open(run / "fd.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{config} s{seed} {row['kimg']:.0f} kimg: FD {results[extractor.name]:.3f}", flush=True)


def read_rows(run: Path) -> list[dict]:
    path = run / "fd.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report(args: argparse.Namespace, runs: list[tuple[str, int]]) -> None:
    summary = {}
    for config, seed in runs:
        run = run_dir(args, config, seed)
        rows = sorted(read_rows(run), key=lambda r: r["kimg"])
        if not rows:
            print(f"{config} seed {seed}: no scores yet")
            continue
        curve = [(r["kimg"], r[r["feature_extractor"]]) for r in rows]
        best, final = min(fd for _, fd in curve), curve[-1][1]
        summary[(config, seed)] = (best, final)
        print(f"{config} seed {seed} (n={rows[0]['num_fake']}, ema={rows[0]['ema']}): kimg:FD  "
              + "  ".join(f"{k:.0f}:{fd:.2f}" for k, fd in curve))  # fmt: skip
        print(f"  best {best:.2f}  final {final:.2f} at {curve[-1][0]:.0f} kimg  grid {run / 'samples' / 'final.png'}")
    baseline = [best for (c, _), (best, _) in summary.items() if c.startswith("dcgan")]
    for (config, seed), (best, final) in summary.items():
        if baseline and not config.startswith("dcgan"):
            bar = min(baseline) / args.factor
            ok = final <= bar and final <= 1.5 * best
            print(f"{config} seed {seed}: final {final:.2f} vs bar {bar:.2f} (best baseline {min(baseline):.2f} / "
                  f"{args.factor:g}); final/best {final / best:.2f}: {'PASS' if ok else 'FAIL'}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", type=Path, required=True, help="domain classifier (.pt) for the FD")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="folder for the runs")
    p.add_argument("--run", action="append", default=[], help="CONFIG:SEED, repeatable")
    p.add_argument("--phase", choices=("all", "train", "eval", "report"), default="all")
    p.add_argument("--kimg", type=float, default=320, help="thousands of images per run")
    p.add_argument("--every_kimg", type=float, default=32, help="a checkpoint (and FD) every this many kimg")
    p.add_argument("--num_samples", type=int, default=5000, help="generated images per FD")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--factor", type=float, default=3.0, help="required ratio best baseline FD / final FD")
    p.add_argument("--wait", action="store_true", help="eval: wait for the classifier file to appear")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.run or ["dcgan_fashion_mnist:0"]]
    if args.phase in ("all", "train"):
        train(args, runs)
    if args.phase in ("all", "eval"):
        while args.wait and not args.classifier.is_file():
            time.sleep(10)
        score(args, runs)
    report(args, runs)


if __name__ == "__main__":
    main()

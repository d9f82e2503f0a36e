"""Training throughput of gangen's fit loop (images/s), at the settings of a config file.

    python bench/train_speed.py                                   # the demo config, 150 timed batches
    python bench/train_speed.py --config configs/dcgan_cifar10.yaml --batches 300 -- --trainer.accelerator gpu

Runs a real `Trainer.fit` (Lightning loop, data module, logging) through gangen's CLI classes; the first
`--warmup` batches are not timed. Prints one line: images/s, ms per batch, batch size, torch threads, device.
Issue-5's bench/throughput.py compares against a classic DCGAN loop; this one only measures gangen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without PYTHONPATH
from gangen.cli import GANCLI  # noqa: E402
from gangen.data import ImageDataModule  # noqa: E402
from gangen.system import GAN  # noqa: E402


class BatchTimer(L.Callback):
    """Times `batches` training batches after `warmup`, counted over the whole fit (epochs may end in between:
    a per-epoch batch_idx restarted the clock at every epoch), then stops the fit."""

    def __init__(self, warmup: int, batches: int) -> None:
        self.warmup, self.wanted = warmup, batches
        self.seen = self.images = self.batches = 0
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.images += batch[0].shape[0]
            self.batches += 1
            if self.batches == self.wanted:
                _sync()
                self.end = time.perf_counter()  # before teardown (Lightning moves the model off the GPU)
                trainer.should_stop = True


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_fashion_mnist.yaml")
    p.add_argument("--batches", type=int, default=150, help="timed batches")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="extra CLI arguments after --, e.g. --data.batch_size 128")
    args = p.parse_args()
    timer = BatchTimer(args.warmup, args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        cli = GANCLI(
            GAN, ImageDataModule, run=False, auto_configure_optimizers=False,
            args=["--config", args.config, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                  "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]", "--trainer.max_epochs", "-1",
                  "--trainer.max_steps", "-1", "--trainer.default_root_dir", tmp, *args.overrides],
        )  # fmt: skip
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    if timer.batches < args.batches:
        raise SystemExit(f"the fit stopped after {timer.batches} of {args.batches} timed batches")
    seconds = timer.end - timer.start
    batch = cli.datamodule.hparams.batch_size
    print(
        f"{timer.images / seconds:.0f} img/s  {1000 * seconds / timer.batches:.1f} ms/batch  batch {batch}  "
        f"threads {torch.get_num_threads()}  device {cli.trainer.strategy.root_device}  config {args.config}"
    )


if __name__ == "__main__":
    main()

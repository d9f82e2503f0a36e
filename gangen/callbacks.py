"""Training side effects: sample grids from fixed latents, written to the run folder and the loggers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from gangen.errors import ConfigError
from gangen.sampling import atomic_file, generate, grid_pixels, latents, save_pixels


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs scalars at: batches trained (not global_step, which counts both optimizers)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def writes_logs_now(trainer: L.Trainer) -> bool:
    """Whether Lightning sends this training batch's step scalars to the loggers (asked during the batch):
    every log_every_n_steps batches, and when the run stops."""
    every = trainer.log_every_n_steps
    return trainer.should_stop or (every > 0 and (logging_step(trainer) + 1) % every == 0)


def eval_generator(pl_module: L.LightningModule) -> torch.nn.Module:
    """The generator to sample from: GAN.eval_generator (the EMA one, statistics re-estimated) or `.generator`."""
    pick = getattr(pl_module, "eval_generator", None)
    return pick() if callable(pick) else pl_module.generator


def log_image(trainer: L.Trainer, key: str, pixels: np.ndarray) -> None:
    """Send one (H, W, C) uint8 image (the PNG grid's pixels) to every logger that takes images, at the
    scalars' step."""
    step = logging_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # WandbLogger and others with the same method; wandb.Image casts a
            logger.log_image(key=key, images=[pixels[..., 0] if pixels.shape[-1] == 1 else pixels], step=step)
            # float array to uint8 without scaling (a [0, 1] grid became black), so it gets uint8 pixels


class _SyncFreeBar:
    """Progress-bar mixin: the bar's metrics are read every `metrics_every` training batches only, and they
    include the module's logged `show` scalars (read from callback_metrics, as numbers).

    Turning a logged GPU tensor into a number waits for all queued GPU work. Lightning does that for every
    `prog_bar=True` scalar at every batch end (even with no bar), so on CUDA GAN logs its step scalars
    without `prog_bar` and this bar shows them, at most `metrics_every` batches old. The counter and speed
    refresh as usual. The CLI puts it in place of Lightning's TQDM / Rich bar on CUDA runs.
    """

    def __init__(self, *args: Any, metrics_every: int = 50, show: tuple[str, ...] = ("loss/",), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if metrics_every < 1:
            raise ConfigError(f"metrics_every {metrics_every!r} must be >= 1")
        self.metrics_every, self.show = metrics_every, show
        self._metrics: dict[str, Any] | None = None
        self._stale_ok = False  # True while a training-batch refresh may show the last metrics read

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if self._metrics is None or not self._stale_ok:
            metrics = super().get_metrics(trainer, pl_module)
            for key, value in trainer.callback_metrics.items():
                if key.startswith(self.show) and key not in metrics:
                    metrics[key] = float(value)  # the one host-device sync of this refresh
            self._metrics = metrics
        return self._metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stale_ok = (args[-1] + 1) % self.metrics_every != 0  # args[-1]: batch_idx
        try:
            super().on_train_batch_end(trainer, pl_module, *args)
        finally:
            self._stale_ok = False


class SyncFreeProgressBar(_SyncFreeBar, TQDMProgressBar):
    """Lightning's TQDMProgressBar without a host-device sync per batch (see _SyncFreeBar)."""


class SyncFreeRichProgressBar(_SyncFreeBar, RichProgressBar):
    """Lightning's RichProgressBar without a host-device sync per batch (see _SyncFreeBar)."""


class SampleGrid(L.Callback):
    """Every `every_kimg` thousand images seen, a grid of the module's fixed latents (`grid_z`), drawn by the
    EMA generator when the module has one.

    Grids go to <run folder>/samples/kimg<NNNNNN>.png (images seen // 1000; with an every_kimg that is not
    a whole number, kimg<NNNNNN>_<III>.png with the images beyond the thousands) and to the loggers under
    "samples"; at the end of training a final grid is written as samples/final.png. Rank 0 only. The
    schedule counts whole images (every round(every_kimg * 1000)), so it does not drift.
    """

    def __init__(self, every_kimg: float = 10.0, nrow: int = 8) -> None:
        if every_kimg <= 0 or round(every_kimg * 1000) < 1:
            raise ConfigError(f"SampleGrid every_kimg {every_kimg!r} must be at least 0.001 (one image)")
        if nrow < 1:
            raise ConfigError(f"SampleGrid nrow {nrow!r} must be >= 1")
        self.every_kimg = every_kimg
        self.every_images = round(every_kimg * 1000)
        self.nrow = nrow
        self._next_images: int | None = None

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def grid_name(self, images_seen: int) -> str:
        """kimg<NNNNNN>, or kimg<NNNNNN>_<III> when the schedule is not in whole kimg (names stay unique)."""
        whole, rest = divmod(images_seen, 1000)
        return f"kimg{whole:06d}" if self.every_images % 1000 == 0 else f"kimg{whole:06d}_{rest:03d}"

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        folder = self.folder(trainer)  # on every rank: trainer.log_dir is a collective call under DDP
        generator = eval_generator(pl_module)  # on every rank too: its batchnorm re-estimate runs forward passes
        if not trainer.is_global_zero:
            return None
        # (N, C, H, W); rank 0 only: a NaN refusal here would leave the other ranks waiting (check_finite does it)
        images = generate(generator, len(pl_module.grid_z), z=pl_module.grid_z, check_finite=False)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = grid_pixels(images, self.nrow)  # (H, W, C) uint8: the file and the loggers get the same
        path = save_pixels(pixels, folder / f"{name}.png")
        log_image(trainer, "samples", pixels)
        return path

    def _schedule_after(self, images_seen: int) -> None:
        self._next_images = (images_seen // self.every_images + 1) * self.every_images

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._schedule_after(pl_module.images_seen)
        if pl_module.images_seen == 0:
            self.write(trainer, pl_module, self.grid_name(0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        seen = pl_module.images_seen  # host-side counter: no device sync
        if self._next_images is not None and seen >= self._next_images:
            self.write(trainer, pl_module, self.grid_name(seen))
            self._schedule_after(seen)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "final")


class GANMetrics(L.Callback):
    """FID / KID / IS (or a domain classifier's FD) of generated images, at validation time.

    Every validation after at least `every_kimg` thousand more images seen (0: every validation; during
    `validate`: always), `num_samples` images are generated from fixed latents (seed) by the EMA generator if
    the module has one, else the generator, and compared with the real statistics of `real_split`
    (computed once, cached on disk). Logged as metric/fid, metric/kid, metric/kid_std, metric/is,
    metric/is_std (or metric/<fd_name>, metric/<fd_name>_kid, ...) and metric/num_samples, so
    ModelCheckpoint(monitor="metric/fid") and EarlyStopping use them; every result also goes as one JSON
    line to <run folder>/metrics.jsonl. Under DDP each rank generates its share of exactly `num_samples`
    images, features are gathered in rank order, and every rank computes the same values.

    feature_extractor: "inception" (weights: inception_weights, else $GANGEN_INCEPTION_WEIGHTS, else the
    torch hub cache; resolved and its tensor names and shapes checked when the callback is built, so a missing
    or foreign file fails before training), a path to a classifier from `gangen train-classifier`, or "none" to
    switch metrics off. The counts, batch_size and cache_dir are checked then too, whether or not metrics are on.
    """

    def __init__(
        self,
        feature_extractor: str = "inception",  # "inception" | path to a domain classifier | "none"
        inception_weights: str | None = None,  # weights file for "inception" (see gangen.metrics)
        num_samples: int = 10_000,  # generated images per evaluation
        every_kimg: float = 0.0,  # minimum kimg between evaluations; 0: at every validation
        real_split: str = "val",  # "val" (held-out split) or "train"
        num_real: int | None = None,  # real images for the statistics; None: the whole split
        batch_size: int = 64,  # images per generator / extractor pass
        seed: int = 0,  # latents of the evaluated images
        cache_dir: str | None = None,  # real statistics cache; None: $GANGEN_CACHE_DIR or ~/.cache/gangen
    ) -> None:
        from gangen.decoded import cache_root
        from gangen.metrics import check_cache_dir
        from gangen.sampling import check_seed

        _check_counts(num_samples, num_real, batch_size)
        if isinstance(every_kimg, bool) or not isinstance(every_kimg, (int, float)) or not every_kimg >= 0:
            raise ConfigError(f"--metrics.every_kimg {every_kimg!r} must be >= 0 (0: at every validation)")
        check_seed(seed, "--metrics.seed")  # generate's range
        if real_split not in ("val", "train"):
            raise ConfigError(f"--metrics.real_split {real_split!r} is invalid: use 'val' or 'train'")
        check_cache_dir(cache_dir, "--metrics.cache_dir")
        self.enabled = feature_extractor != "none"
        if self.enabled and cache_dir is None:
            cache_root()  # $GANGEN_CACHE_DIR a file: said now, not at the first evaluation
        self.feature_extractor, self.num_samples, self.every_kimg = feature_extractor, num_samples, every_kimg
        self.real_split, self.num_real, self.batch_size, self.seed = real_split, num_real, batch_size, seed
        self.cache_dir = cache_dir
        self.weights: Path | None = None
        if feature_extractor == "inception":
            self.weights = _inception_weights(inception_weights)  # fails fast, before any training
        elif self.enabled:
            from gangen.classifier import load_classifier

            load_classifier(feature_extractor)  # fails fast on a missing or foreign file
        self._extractor: Any = None
        self._real: Any = None
        self._last_kimg: float | None = None

    def logged_keys(self) -> list[str]:
        """The metric/* keys this callback can log, the distance first (none when switched off)."""
        if not self.enabled:
            return []
        name = self.feature_extractor
        if name != "inception":
            from gangen.classifier import metric_name

            name = metric_name(name)
        fd, prefix = _result_names(name)
        return [f"metric/{fd}", "metric/num_samples", *(f"metric/{prefix}{out}" for _, out in _LOGGED_EXTRAS)]

    def state_dict(self) -> dict[str, Any]:
        """The evaluation schedule, so a resumed run evaluates when the uninterrupted one would have, and the
        settings its rows are measured with (`gangen evaluate --ckpt_path` takes them as its defaults)."""
        settings = {"num_samples": self.num_samples, "seed": self.seed, "real_split": self.real_split}
        return {"last_kimg": self._last_kimg, "settings": {**settings, "num_real": self.num_real}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_kimg = state_dict.get("last_kimg")

    def _setup_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from gangen.inception import make_feature_extractor
        from gangen.metrics import real_statistics

        if self._extractor is None:
            self._extractor = make_feature_extractor(self.feature_extractor, self.weights, device=pl_module.device)
        if self._real is None:

            def load() -> Any:
                return real_statistics(
                    trainer.datamodule, self._extractor, split=self.real_split, num_samples=self.num_real,
                    batch_size=self.batch_size, cache_dir=self.cache_dir,
                )  # fmt: skip

            if trainer.is_global_zero:  # rank 0 fills the cache, the others then read it
                self._real = load()
            trainer.strategy.barrier("gangen-real-statistics")
            self._real = self._real or load()

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Metrics of exactly num_samples generated images, split over the ranks."""
        from gangen.metrics import Evaluator, generated_features

        self._setup_metrics(trainer, pl_module)
        generator = eval_generator(pl_module)
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in generator.parameters()):  # bf16-true, 16-true
            generator = copy.deepcopy(generator).float()  # sampled as `evaluate` and `generate` sample it: float32
        z = latents(self.num_samples, generator.latent_dim, self.seed)  # (N, latent), the same on every rank
        rank, world = trainer.global_rank, trainer.world_size
        start = rank * len(z) // world
        mine = z[start : (rank + 1) * len(z) // world]  # this rank's share; shares add up to N
        # {"pool": (n_r, D), ...}; a conditional G's classes follow the image's index in the whole set
        features = generated_features(generator, mine, self._extractor, self.batch_size, label_offset=start)
        if world > 1:
            features = {k: _gather_rows(trainer, v, self.num_samples) for k, v in features.items()}
        evaluator = Evaluator(self._extractor, self._real, batch_size=self.batch_size)
        evaluator.update_features(features)
        return {  # what the numbers were measured with, under evaluate's JSON names (num_real: the count used)
            **evaluator.compute(), "latent_seed": self.seed, "real_split": self.real_split,
            "num_real_requested": self.num_real, "ema": getattr(pl_module, "generator_ema", None) is not None,
            "real_from_cache": self._real.from_cache,
        }  # fmt: skip

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and self.num_samples < trainer.world_size:  # a rank without images skips the gathers
            raise ConfigError(
                f"metrics num_samples {self.num_samples} is fewer than the {trainer.world_size} processes that "
                f"share them: use --metrics.num_samples {trainer.world_size} or more (10000+ is usual)"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed fit (the checkpoint restored) drops the metrics.jsonl rows written after its checkpoint: a
        run killed after an evaluation but before the checkpoint of it evaluates that kimg again, and a resume
        into the same folder (a fixed logger version, a W&B id) appended a second row for it. A last line cut
        short by a kill goes too."""
        if not self.enabled or trainer.ckpt_path is None:
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / "metrics.jsonl"  # collective: every rank
        if not trainer.is_global_zero or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        # in whole images: the checkpoint's last evaluation and the rows up to it stay; a checkpoint without the
        # schedule (an older gangen) keeps the rows before its images
        last = round(self._last_kimg * 1000) if self._last_kimg is not None else pl_module.images_seen - 1
        kept = [line for line in lines if line.endswith("\n") and _row_kimg(line) * 1000 < last + 0.5]
        if len(kept) < len(lines):
            atomic_file(path, lambda tmp: Path(tmp).write_text("".join(kept)))
            rank_zero_info(
                f"gangen: {len(lines) - len(kept)} row(s) of {path} written after the checkpoint were dropped "
                "(the resumed run evaluates those kimg again)"
            )

    def due(self, images_seen: int) -> bool:
        """Whether a fit's validation at `images_seen` evaluates: every_kimg after the last evaluation, compared
        in whole images (in float kimg, 9.6 - 6.4 < 3.2 skipped an evaluation)."""
        if self._last_kimg is None:
            return True
        return images_seen - round(self._last_kimg * 1000) >= round(self.every_kimg * 1000)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        kimg = pl_module.images_seen / 1000
        if trainer.state.fn == "fit" and not self.due(pl_module.images_seen):
            return
        self._last_kimg = kimg
        results = self.evaluate(trainer, pl_module)
        fd, prefix = _result_names(results["feature_extractor"])
        logged = {f"metric/{fd}": results[fd], "metric/num_samples": float(results["num_fake"])}
        for key, out in _LOGGED_EXTRAS:
            if f"{prefix}{key}" in results:
                logged[f"metric/{prefix}{out}"] = results[f"{prefix}{key}"]
        logged["progress/kimg"] = kimg  # the metrics' own kimg: on CUDA the training step logs it only on the
        # batches whose logs Lightning writes, so a best-checkpoint name (best-kimg{progress/kimg}-fid...) was
        # up to log_every_n_steps batches behind
        for key, value in logged.items():
            pl_module.log(key, value, sync_dist=True)  # identical on every rank; sync keeps Lightning consistent
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP: every rank calls it
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "metrics.jsonl", "a") as f:
                row = {"kimg": kimg, **_steps(trainer, pl_module)}
                f.write(json.dumps(row | results) + "\n")  # step: the loggers' step (batches trained)


def _steps(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
    """A metrics row's step (the loggers' step: the last trained batch's, counted from 0) and global_step
    (optimizer steps). Lightning restores no loop progress in `validate`, where both were 0 next to the
    checkpoint's kimg: the checkpoint's are used there, as fit's row of the same kimg has them (fit evaluates
    before Lightning counts the batch)."""
    if trainer.state.fn == "fit":
        return {"step": logging_step(trainer), "global_step": trainer.global_step}
    loaded = getattr(pl_module, "checkpoint_global_step", None)
    return {
        "step": max(int(getattr(pl_module, "batches_seen", 0)) - 1, 0),
        "global_step": trainer.global_step if loaded is None else loaded,
    }


def _row_kimg(line: str) -> float:
    """A metrics.jsonl row's kimg; inf for a line that does not parse (cut short), so it is dropped."""
    try:
        return float(json.loads(line)["kimg"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_counts(num_samples: Any, num_real: Any, batch_size: Any) -> None:
    """Counts the first evaluation would refuse (or crash on) only after a whole epoch of training."""
    for option, value, low, hint in (
        ("num_samples", num_samples, 2, " (FID needs 2; 10000+ is usual)"),
        ("num_real", num_real, 2, " or null (the whole split)"),
        ("batch_size", batch_size, 1, ""),
    ):
        if option == "num_real" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--metrics.{option} {value!r} must be >= {low}{hint}")


def _inception_weights(given: str | None) -> Path:
    """The Inception weights file (gangen.inception.resolve_inception_weights), its tensor names and shapes
    checked: a foreign file is refused now, not at the first evaluation after an epoch of training."""
    import os

    from gangen.inception import ENV_VAR, check_inception_weights, resolve_inception_weights

    path = resolve_inception_weights(given)
    if given is not None:
        origin = "--metrics.inception_weights"
    else:
        origin = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "Inception weights"
    check_inception_weights(path, origin)
    return path


_LOGGED_EXTRAS = (("kid_mean", "kid"), ("kid_std", "kid_std"), ("is_mean", "is"), ("is_std", "is_std"))  # result, log


def _result_names(extractor: str) -> tuple[str, str]:
    """(distance key, prefix of the other keys) of an extractor's results: ("fid", "") for Inception, else
    (name, "name_"), so a domain classifier's distance is never logged as FID."""
    return ("fid", "") if extractor == "inception" else (extractor, f"{extractor}_")


def _gather_rows(trainer: L.Trainer, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's (n_r, D) rows in rank order (shares from the split above, summing to total)."""
    world = trainer.world_size
    sizes = [(r + 1) * total // world - r * total // world for r in range(world)]
    padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = trainer.strategy.all_gather(padded)  # (world, max_n, D)
    return torch.cat([gathered[r, : sizes[r]] for r in range(world)])

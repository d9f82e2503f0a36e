"""Command line: Lightning's CLI (fit, validate) plus gangen's own `generate`.

    gangen fit --config configs/dcgan_fashion_mnist.yaml [--data.batch_size 128 ...]
    gangen validate --config configs/dcgan_fashion_mnist.yaml --ckpt_path PATH
    gangen generate --ckpt_path PATH --num_samples 64 --output grid.png | DIR/ | samples.npz
    gangen export --ckpt_path PATH --output generator.safetensors

User errors (gangen.errors.GanGenError) are printed as one line and exit with status 2 (divergence: 3;
SIGTERM / SIGINT during fit: a checkpoint, then 128 + the signal number).
Set GANGEN_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gangen.callbacks import GANMetrics
from gangen.data import ImageDataModule
from gangen.distributed import check_trainer, global_batch
from gangen.distributed import multi_process as _multi_process
from gangen.errors import ConfigError, GanGenError
from gangen.sampling import (
    checkpoint_data,
    generate,
    interpolation_latents,
    load_generator,
    output_kind,
    read_checkpoint,
    save_grid,
    save_npz,
    save_png_folder,
)
from gangen.system import GAN

DESCRIPTION = (
    "gangen: train DCGAN-style GANs with Lightning. Subcommands: fit, validate (Lightning's CLI; "
    "see `gangen fit --help`), generate, evaluate, export, train-classifier and download-weights "
    "(see `gangen generate --help` etc.)."
)


class SaveFitConfig(SaveConfigCallback):
    """Writes the resolved config.yaml into the run folder for `fit` only (validate leaves no files)."""

    def setup(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        """The resolved config also goes to W&B (rank 0), where it shows as the run's config."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


class GANCLI(LightningCLI):
    """LightningCLI with the subcommands a GAN needs and a data/model consistency check."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        """A top-level `metrics:` section (--metrics.*): FID/KID/IS or domain FD at validation time."""
        parser.add_lightning_class_args(GANMetrics, "metrics")

    def before_instantiate_classes(self) -> None:
        """Multi-process training works out of the box: strategy "auto" becomes DDP with
        find_unused_parameters=True when more than one device or node is asked for. Plain DDP refuses a GAN
        step (G and D sit in one DDP wrapper and each backward uses only one of them)."""
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        trainer = config.get("trainer")
        if trainer is None:
            return
        check_trainer(trainer)  # devices, strategy, SyncBatchNorm: one line each, before anything is built
        _check_wandb(trainer.get("logger"))
        if trainer.get("strategy") == "auto" and _multi_process(trainer):
            trainer["strategy"] = "ddp_find_unused_parameters_true"
        _speed_defaults(trainer)

    def _check_shapes(self) -> None:
        """The data must have the resolution and channels the networks were built for."""
        g = getattr(self.model.generator, "config", {})
        d = self.datamodule.hparams
        for key in ("resolution", "channels"):
            if key in g and g[key] != d[key]:
                raise ConfigError(
                    f"data.{key}={d[key]} but model.generator {key}={g[key]}: set both to the same value "
                    f"(e.g. --data.{key} {g[key]})"
                )

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyperparameters of --ckpt_path here, at parse time: read the file safely first,
        so a missing, corrupt, foreign or code-carrying checkpoint is one line before anything is built."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc"):
            self._read_ckpt = (ckpt_path, read_checkpoint(ckpt_path))  # kept for _check_resume: read once
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's Trainer plus gangen's fault tolerance: atomic, weights_only checkpoint files (unless a
        CheckpointIO plugin was configured) and a checkpoint on SIGTERM / SIGINT. Lightning's refusals of
        Trainer settings become one ConfigError line."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from gangen.reliability import AtomicCheckpointIO, Preemption

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # refused deep in Trainer.__init__: one line
            if isinstance(err, GanGenError):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"Lightning refused the trainer settings: {first}") from err
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, Preemption) for c in trainer.callbacks):
            trainer.callbacks.append(Preemption())
        _sync_free_progress_bar(trainer)
        return trainer

    def before_fit(self) -> None:
        self._check_shapes()
        self._check_resume()
        if getattr(self.model, "cuda_graph", None) is True:  # None (auto) falls back to the eager step instead
            self.model.check_cuda_graph(self.trainer)
        trainer = self.trainer
        if trainer.global_rank == 0:  # ranks are known once the Trainer exists, before any process is launched
            line = global_batch(self.datamodule.hparams["batch_size"], trainer.num_devices, trainer.num_nodes)
            print(line, flush=True)  # information on stdout; stderr carries errors only

    def before_validate(self) -> None:
        self._check_shapes()

    def _check_resume(self) -> None:
        """`--ckpt_path last` means the newest last.ckpt of this run name (any version); any checkpoint is read
        safely and checked against the model before a run folder is written."""
        from gangen.reliability import find_last_checkpoint

        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            logger = self.trainer.logger
            folders = [Path(self.trainer.default_root_dir)]
            if logger is not None and getattr(logger, "root_dir", None):
                folders.insert(0, Path(logger.root_dir))
            found = find_last_checkpoint(folders)
            if found is None:  # Lightning's meaning too: set and forget, the first run starts from scratch
                print(f"gangen: no last.ckpt under {', '.join(map(str, folders))}: training from scratch", flush=True)
                config["ckpt_path"] = None
                return
            ckpt_path = config["ckpt_path"] = str(found)
            print(f"gangen: resuming from {found}", flush=True)
        cached_path, ckpt = getattr(self, "_read_ckpt", (None, None))
        self._read_ckpt = (None, None)  # not kept alive during training
        ckpt = ckpt if cached_path == ckpt_path else read_checkpoint(ckpt_path)
        for name in ("generator", "discriminator"):
            saved = (ckpt["hyper_parameters"].get(name) or {}).get("init_args", {})
            current = getattr(getattr(self.model, name), "config", {})
            for key, value in saved.items():
                if key in current and current[key] != value:
                    raise ConfigError(
                        f"checkpoint {ckpt_path} was trained with {name} {key}={value!r}, the config has "
                        f"{current[key]!r}: resume with the checkpoint's settings (--model.{name}.{key} {value})"
                    )


def _check_wandb(logger: Any) -> None:
    """W&B asked online with no API key fails here, as one line (inside the logger jsonargparse would wrap it)."""
    from gangen.tracking import wandb_mode

    for spec in logger if isinstance(logger, list) else [logger]:
        if str(getattr(spec, "class_path", "") or "").endswith("WandbLogger"):
            wandb_mode((getattr(spec, "init_args", None) or {}).get("offline"))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 convolutions there run about 2x fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes (torch >= 2.3)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _sync_free_progress_bar(trainer: Trainer, device_type: str | None = None) -> None:
    """On CUDA (`device_type`, default: the trainer's), Lightning's own TQDM or Rich bar becomes gangen's
    sync-free one with the same settings, showing the losses every log_every_n_steps batches."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from gangen.callbacks import SyncFreeProgressBar, SyncFreeRichProgressBar

    bar = trainer.progress_bar_callback
    if (device_type or trainer.strategy.root_device.type) != "cuda":
        return
    every = max(1, trainer.log_every_n_steps or 50)
    if type(bar) is TQDMProgressBar:
        new = SyncFreeProgressBar(bar.refresh_rate, bar.process_position, bar._leave, metrics_every=every)
    elif type(bar) is RichProgressBar:
        new = SyncFreeRichProgressBar(bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs, metrics_every=every)
    else:  # none, or the user's own
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = new


def _speed_defaults(trainer: Any) -> None:
    """Unset precision / benchmark: bf16-mixed where the GPU (or the CPU, natively) computes bf16, and
    cudnn.benchmark on CUDA. An explicit value (e.g. --trainer.precision 32-true) is kept."""
    accelerator = trainer.get("accelerator", "auto")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if trainer.get("precision") is None and torch.cuda.is_bf16_supported(including_emulation=False):
            trainer["precision"] = "bf16-mixed"
        if trainer.get("benchmark") is None and not trainer.get("deterministic"):
            trainer["benchmark"] = True
    elif accelerator in ("auto", "cpu") and trainer.get("precision") is None and native_bf16_cpu():
        trainer["precision"] = "bf16-mixed"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; we print one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def generate_command(argv: Sequence[str]) -> None:
    p = _OneLineParser(prog="gangen generate", description="Generate images from a gangen checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `gangen fit`")
    p.add_argument("--output", required=True, help="grid.png | grid.jpg | DIR/ (one PNG per sample) | out.npz")
    p.add_argument(
        "--num_samples", type=int, default=None, help="images (default 64); with --interpolate: strips (default 8)"
    )
    p.add_argument("--seed", type=int, default=0, help="latent seed: same seed, same images")
    p.add_argument("--interpolate", type=int, default=0, metavar="K", help="write strips of K images along slerp paths")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default 8, or K with --interpolate)")
    p.add_argument("--batch_size", type=int, default=256, help="images generated per forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--class_label", type=int, default=None, help="class of every image (conditional models)")
    args = p.parse_args(argv)

    num = args.num_samples if args.num_samples is not None else (8 if args.interpolate else 64)
    if num <= 0:
        raise ConfigError(f"--num_samples {num} must be > 0")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch_size {args.batch_size} must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device!r}: no CUDA device is available here; use --device cpu")
    kind = output_kind(args.output)
    generator = load_generator(args.ckpt_path, args.device)
    z = None
    if args.interpolate:
        z = interpolation_latents(num, args.interpolate, generator.latent_dim, args.seed)
        num = len(z)
    labels = None
    if args.class_label is not None:
        classes = int(getattr(generator, "num_classes", 0) or 0)
        if not 0 <= args.class_label < classes:
            raise ConfigError(
                f"--class_label {args.class_label}: the checkpoint's generator "
                + (f"has classes 0..{classes - 1}" if classes else "is unconditional; drop --class_label")
            )
        labels = torch.full((num,), args.class_label, dtype=torch.long)
    images = generate(generator, num, seed=args.seed, batch_size=args.batch_size, z=z, labels=labels)  # (N,C,H,W)
    if kind == "grid":
        path = save_grid(images, args.output, nrow=args.nrow or (args.interpolate or 8))
    elif kind == "npz":
        path = save_npz(images, args.output)
    else:
        path = save_png_folder(images, args.output)
    print(f"wrote {len(images)} images {tuple(images.shape[1:])} to {path}")


def train_classifier_command(argv: Sequence[str]) -> None:
    """`gangen train-classifier --data.dataset fashion_mnist --output classifier.pt` (or --data DATA.yaml)."""
    from jsonargparse import ArgumentParser

    from gangen.classifier import save_classifier, train_classifier

    p = ArgumentParser(
        prog="gangen train-classifier",
        description="Train a small classifier on a dataset's labels; its features give metric/fd_<name>.",
    )
    p.add_class_arguments(ImageDataModule, "data", sub_configs=True)
    p.add_argument("--output", type=str, required=True, help="where to save the classifier (.pt)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", type=str, default="auto", help="cpu | gpu | auto")
    cfg = p.parse_args(list(argv))
    output = Path(cfg.output)
    if not output.parent.is_dir():
        raise ConfigError(f"--output {cfg.output!r}: folder {output.parent} does not exist; create it first")
    datamodule = p.instantiate_classes(cfg).data
    classifier, accuracy = train_classifier(
        datamodule, epochs=cfg.epochs, lr=cfg.lr, width=cfg.width, seed=cfg.seed, accelerator=cfg.accelerator
    )
    hp = datamodule.hparams
    save_classifier(classifier, output, dataset=hp["dataset"], resolution=hp["resolution"], accuracy=accuracy)
    print(f"held-out accuracy {accuracy:.4f}; saved {output}")


def load_samples(path: str) -> torch.Tensor:
    """uint8 (N, C, H, W) from an .npz (arr_0, (N, H, W, C) uint8) or a folder of images (sorted by name)."""
    import numpy as np
    from PIL import Image

    from gangen.errors import DataNotFoundError
    from gangen.readers import IMAGE_EXTENSIONS

    source = Path(path)
    if source.suffix == ".npz" and source.is_file():
        with np.load(source) as npz:
            array = npz[npz.files[0]]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ConfigError(f"{path}: expected a uint8 array (N, H, W, 1 or 3), got {array.dtype} {array.shape}")
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataNotFoundError(f"no images in {path}: write some with `gangen generate --output {path}/`")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16", "1") else "RGB")))
        array = np.stack(arrays)
        array = array[..., None] if array.ndim == 3 else array
    else:
        raise DataNotFoundError(
            f"samples {path!r} not found: pass a folder of images or an .npz from `gangen generate`"
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def evaluate_command(argv: Sequence[str]) -> None:
    """`gangen evaluate --ckpt_path PATH | --samples DIR_OR_NPZ [--data.* ...]`: metrics printed and as JSON."""
    import json

    from jsonargparse import ArgumentParser

    from gangen.inception import make_feature_extractor
    from gangen.metrics import Evaluator, evaluate_generator, real_statistics

    p = ArgumentParser(prog="gangen evaluate", description="FID / KID / IS or a domain FD of a checkpoint or samples.")
    p.add_argument("--ckpt_path", type=str | None, default=None, help="gangen checkpoint to generate from")
    p.add_argument("--samples", type=str | None, default=None, help="folder of images or .npz, instead of a ckpt")
    p.add_class_arguments(ImageDataModule, "data", sub_configs=True)
    p.add_argument("--num_samples", type=int, default=10_000, help="images generated from the checkpoint")
    p.add_argument("--feature_extractor", type=str, default="inception", help="inception | classifier path")
    p.add_argument("--inception_weights", type=str | None, default=None, help="Inception weights file")
    p.add_argument("--split", type=str, default="val", help="real split: val or train")
    p.add_argument("--num_real", type=int | None, default=None, help="real images (default: the whole split)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="latent seed of the generated images")
    p.add_argument("--device", type=str, default="cpu", help="cpu | cuda")
    p.add_argument("--cache_dir", type=str | None, default=None, help="real statistics cache")
    p.add_argument("--output", type=str | None, default=None, help="JSON file (default: beside the input)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt_path", default=None)
    pre.add_argument("--samples", default=None)
    known = pre.parse_known_args(list(argv))[0]
    if "-h" not in argv and "--help" not in argv and (known.ckpt_path is None) == (known.samples is None):
        raise ConfigError("pass exactly one of --ckpt_path (generate and evaluate) or --samples (evaluate files)")
    ckpt = read_checkpoint(known.ckpt_path) if known.ckpt_path else None  # read once, used twice
    if ckpt is not None:  # the checkpoint's data settings are the defaults; --data.* still overrides them
        p.set_defaults({f"data.{k}": v for k, v in _checkpoint_data(ckpt, known.ckpt_path).items()})
    args = p.parse_args(list(argv))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device!r}: no CUDA device is available here; use --device cpu")
    if args.num_samples < 2:
        raise ConfigError(f"--num_samples {args.num_samples} must be >= 2 (FID needs 2; 10000+ is usual)")
    source = Path(args.ckpt_path or args.samples)
    samples = load_samples(args.samples) if args.samples else None  # (N, C, H, W) uint8
    datamodule = p.instantiate_classes(args).data
    extractor = make_feature_extractor(args.feature_extractor, args.inception_weights, device=args.device)
    count = args.num_samples if samples is None else len(samples)
    output = Path(args.output) if args.output else source.parent / f"metrics-{extractor.name}-n{count}.json"
    if not output.parent.is_dir():
        raise ConfigError(f"--output {str(output)!r}: folder {output.parent} does not exist; create it first")
    real = real_statistics(
        datamodule, extractor, split=args.split, num_samples=args.num_real, batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )  # fmt: skip
    if samples is not None:
        evaluator = Evaluator(extractor, real, batch_size=args.batch_size)
        evaluator.update(samples)
        results = evaluator.compute()
    else:
        generator = load_generator(ckpt, args.device)
        results = evaluate_generator(generator, args.num_samples, real, extractor, args.batch_size, args.seed)
    results = {"source": str(source), "real_split": args.split, "real_from_cache": real.from_cache, **results}
    text = json.dumps(results, indent=2)
    output.write_text(text + "\n")
    print(text)
    print(f"wrote {output}")


def _checkpoint_data(ckpt: dict, ckpt_path: str) -> dict:
    """The data settings a gangen checkpoint was trained with (its datamodule hyperparameters)."""
    data = checkpoint_data(ckpt)
    if not data:
        raise ConfigError(f"{ckpt_path} does not record its data: pass --data.dataset ... --data.resolution ...")
    return data


def download_weights_command(argv: Sequence[str]) -> None:
    from gangen.inception import INCEPTION_URL, download_inception_weights, hub_cache_path

    p = _OneLineParser(prog="gangen download-weights", description="Fetch the FID Inception weights (network).")
    p.add_argument("--dest", default=None, help=f"file to write (default: {hub_cache_path()})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    args = p.parse_args(argv)
    path = download_inception_weights(args.dest, timeout=args.timeout)
    print(f"downloaded {INCEPTION_URL} to {path}")


def export_command(argv: Sequence[str]) -> None:
    from gangen.sampling import check_output_folder, export_safetensors

    p = _OneLineParser(prog="gangen export", description="Write a checkpoint's generator as .safetensors.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `gangen fit`")
    p.add_argument("--output", required=True, help="generator.safetensors (config as JSON in its metadata)")
    p.add_argument("--no_ema", action="store_true", help="export the trained generator even if there is an EMA one")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output {args.output!r}: end it with .safetensors")
    check_output_folder(args.output, output.parent)
    path, is_ema = export_safetensors(read_checkpoint(args.ckpt_path), output, ema=not args.no_ema)
    print(f"wrote the {'EMA ' if is_ema else ''}generator of {args.ckpt_path} to {path}")


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "evaluate": evaluate_command,
    "export": export_command,
    "download-weights": download_weights_command,
    "generate": generate_command,
    "train-classifier": train_classifier_command,
}


def run_lightning_cli(argv: Sequence[str] | None) -> None:
    GANCLI(
        GAN,
        ImageDataModule,
        args=None if argv is None else list(argv),
        auto_configure_optimizers=False,
        save_config_callback=SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": False},  # errors: one line (main)
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            run_lightning_cli(argv)  # None: Lightning reads sys.argv itself
    except ArgumentError as err:  # jsonargparse: unknown keys, bad types; its usage dump becomes one line
        if os.environ.get("GANGEN_DEBUG"):
            raise
        message = " ".join(str(err).split())
        command = args[0] if args and args[0] in GANCLI.subcommands() else ""
        message = message if len(message) <= 400 else message[:400] + " ..."
        print(f"gangen: error: {message} (see `gangen {command + ' ' if command else ''}--help`)", file=sys.stderr)
        sys.exit(2)
    except GanGenError as err:
        if os.environ.get("GANGEN_DEBUG"):
            raise
        print(f"gangen: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except SIGTERMException:  # SIGTERM / SIGINT during fit: Preemption saved a checkpoint
        from gangen.reliability import received_signal

        sys.exit(128 + (received_signal() or 15))

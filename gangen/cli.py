"""Command line: Lightning's CLI (fit, validate) plus gangen's own `generate`.

    gangen fit --config configs/dcgan_fashion_mnist.yaml [--data.batch_size 128 ...]
    gangen validate --config configs/dcgan_fashion_mnist.yaml --ckpt_path PATH
    gangen generate --ckpt_path PATH --num_samples 64 --output grid.png | DIR/ | samples.npz

User errors (gangen.errors.GanGenError) are printed as one line and exit with status 2.
Set GANGEN_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from gangen.data import ImageDataModule
from gangen.errors import ConfigError, GanGenError
from gangen.sampling import (
    generate,
    interpolation_latents,
    load_generator,
    output_kind,
    save_grid,
    save_npz,
    save_png_folder,
)
from gangen.system import GAN

DESCRIPTION = (
    "gangen: train DCGAN-style GANs with Lightning. Subcommands: fit, validate (Lightning's CLI; "
    "see `gangen fit --help`), generate and train-classifier (see `gangen generate --help`)."
)


class SaveFitConfig(SaveConfigCallback):
    """Writes the resolved config.yaml into the run folder for `fit` only (validate leaves no files)."""

    def setup(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class GANCLI(LightningCLI):
    """LightningCLI with the subcommands a GAN needs and a data/model consistency check."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate")}

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

    def before_fit(self) -> None:
        self._check_shapes()

    def before_validate(self) -> None:
        self._check_shapes()


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
    images = generate(generator, num, seed=args.seed, batch_size=args.batch_size, z=z)  # (N, C, H, W)
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


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
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
        parser_kwargs={"description": DESCRIPTION},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            run_lightning_cli(argv)  # None: Lightning reads sys.argv itself
    except GanGenError as err:
        if os.environ.get("GANGEN_DEBUG"):
            raise
        print(f"gangen: error: {err}", file=sys.stderr)
        sys.exit(2)

"""gangen's own subcommands (argparse, not Lightning's CLI): generate, evaluate, export, download-weights,
train-classifier, cache. `gangen.cli.main` dispatches `COMMANDS[argv[0]](argv[1:])`; errors are GanGenErrors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from gangen.data import ImageDataModule
from gangen.errors import ConfigError
from gangen.sampling import (
    atomic_file,
    check_generate_size,
    check_grid_size,
    check_output_file,
    check_seed,
    checkpoint_data,
    generate,
    generator_state,
    interpolation_latents,
    load_generator,
    metrics_settings,
    output_kind,
    read_checkpoint,
    save_grid,
    save_npz,
    save_png_folder,
)


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
    p.add_argument("--seed", type=int, default=0, help="latent seed (default %(default)s): same seed, same images")
    p.add_argument("--interpolate", type=int, default=0, metavar="K", help="write strips of K images along slerp paths")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default 8, or K with --interpolate)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--class_label", type=int, default=None, help="class of every image (conditional models)")
    p.add_argument("--no_ema", action="store_true", help="use the trained generator, not its EMA (if it has one)")
    args = p.parse_args(argv)

    num = args.num_samples if args.num_samples is not None else (8 if args.interpolate else 64)
    if num <= 0:
        raise ConfigError(f"--num_samples {num} must be > 0")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch_size {args.batch_size} must be > 0")
    if args.nrow is not None and args.nrow <= 0:
        raise ConfigError(f"--nrow {args.nrow} must be > 0 (images per grid row)")
    check_seed(args.seed)
    device = _usable_device(args.device)
    kind = output_kind(args.output)
    ckpt = read_checkpoint(args.ckpt_path)
    generator = load_generator(ckpt, device, ema=not args.no_ema, source=args.ckpt_path)
    is_ema = generator_state(ckpt, ema=not args.no_ema)[1]
    nrow = args.nrow or (args.interpolate or 8)
    count = num * (args.interpolate or 1)  # images
    image_shape = generate(generator, 1, check_finite=False).shape[1:]  # (C, H, W) of one image
    what = f"--num_samples {num}" + (
        f" with --interpolate {args.interpolate} ({count} images)" if args.interpolate else ""
    )
    check_generate_size(what, args.output, kind, count, image_shape, generator.latent_dim)  # before the latents
    if kind == "grid":  # a grid wider or taller than the format allows fails only when written
        check_grid_size(args.output, count, nrow, image_shape)
    classes = int(getattr(generator, "num_classes", 0) or 0)
    z = labels = None
    if args.interpolate:
        z = interpolation_latents(num, args.interpolate, generator.latent_dim, args.seed)
        if classes:  # one class per strip (strip r: class r % classes), so a strip walks the latent only
            labels = (torch.arange(num) % classes).repeat_interleave(args.interpolate)
        num = len(z)
    if args.class_label is not None:
        if not 0 <= args.class_label < classes:
            raise ConfigError(
                f"--class_label {args.class_label}: the checkpoint's generator "
                + (f"has classes 0..{classes - 1}" if classes else "is unconditional; drop --class_label")
            )
        labels = torch.full((num,), args.class_label, dtype=torch.long)
    if classes and labels is None:
        labels = torch.arange(num) % classes  # generate()'s own default, kept for the npz
    with _terminate_as_exit():  # SIGTERM cleans up a half-written output like Ctrl-C does
        images = generate(  # (N, C, H, W), uint8 for the large outputs
            generator, num, seed=args.seed, batch_size=args.batch_size, z=z, labels=labels, uint8=kind != "grid"
        )
        try:
            if kind == "grid":
                path = save_grid(images, args.output, nrow=nrow)
            elif kind == "npz":
                path = save_npz(images, args.output, labels=labels)  # a conditional model's classes as arr_1
            else:
                path = save_png_folder(images, args.output)
        except (OSError, ValueError) as err:  # disk full, file size limit, a grid too large for the format
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ConfigError(
                f"--output {args.output!r} could not be written ({reason}); nothing was left there: free space, "
                "or choose fewer samples or another location or format"
            ) from None
    print(f"wrote {len(images)} images {tuple(images.shape[1:])} to {path}" + (" (EMA generator)" if is_ema else ""))


def _usable_device(name: str) -> torch.device:
    """`name` as a torch.device that works here, else a one-line ConfigError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available here; use --device cpu")
    if device.type == "meta":  # tensors without data: generation would fail when the images are copied out
        raise ConfigError(f"--device {name!r} is not a usable device (it holds shapes, no data): use cpu or cuda")
    try:
        torch.empty(1, device=device).cpu()  # made there and copied back, as the images will be
    except (RuntimeError, AssertionError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--device {name!r} is not a usable device here ({first[:150]}); use --device cpu") from None
    return device


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143), so writers' cleanup runs (the default kills at once)."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # ignored, or the program's own: keep it
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_classifier_command(argv: Sequence[str]) -> None:
    """`gangen train-classifier --data.dataset fashion_mnist --output classifier.pt` (or --data DATA.yaml)."""
    from jsonargparse import ArgumentParser

    from gangen.classifier import check_classifier_options, save_classifier, train_classifier

    p = ArgumentParser(
        exit_on_error=False,  # a bad option: one line (gangen.cli.main)
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
    check_output_file(cfg.output, example="classifier.pt")  # before training, not after it
    check_classifier_options(cfg.epochs, cfg.lr, cfg.width, cfg.seed)
    _check_accelerator(cfg.accelerator)
    datamodule = p.instantiate_classes(cfg).data
    classifier, accuracy = train_classifier(
        datamodule, epochs=cfg.epochs, lr=cfg.lr, width=cfg.width, seed=cfg.seed, accelerator=cfg.accelerator
    )
    hp = datamodule.hparams
    save_classifier(classifier, output, dataset=hp["dataset"], resolution=hp["resolution"], accuracy=accuracy)
    print(f"held-out accuracy {accuracy:.4f}; saved {output}")


def _check_accelerator(accelerator: str) -> None:
    """train-classifier's --accelerator: a name Lightning knows, of hardware this machine has (Lightning's
    refusal comes after the data is read, as a traceback)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from gangen.distributed import GPU_ACCELERATORS

    name = accelerator.lower()
    if name == "auto":
        return
    if name in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(
            f"--accelerator {accelerator}: no CUDA GPU is available on this machine; use --accelerator cpu (or auto)"
        )
    known = AcceleratorRegistry.available_accelerators()
    if name not in (*known, *GPU_ACCELERATORS):
        raise ConfigError(f"--accelerator {accelerator!r} is not an accelerator name: use cpu, gpu or auto")
    try:
        available = name in GPU_ACCELERATORS or AcceleratorRegistry[name]["accelerator"].is_available()
    except Exception:  # noqa: BLE001 (an accelerator whose package is missing: torch_xla for tpu)
        available = False
    if not available:
        raise ConfigError(
            f"--accelerator {accelerator}: not available on this machine; use --accelerator cpu (or auto)"
        )


def load_samples(path: str) -> torch.Tensor:
    """uint8 (N, C, H, W) from an .npz (arr_0, (N, H, W, C) uint8) or a folder of images (sorted by name).

    A folder is grey (C=1) when every image is: a grey mode ("L", 16-bit, ...) or a palette of greys (as PNG
    optimisers store grey images). Beside an RGB image a palette is read as RGB; a grey-mode file beside an RGB
    or colour-palette one, or two sizes, raise ConfigError naming both files. An RGB file stays RGB whatever
    its pixels (an RGB generator's samples are 3 channels even when they came out grey)."""
    import numpy as np
    from PIL import Image

    from gangen.errors import DataNotFoundError
    from gangen.readers import IMAGE_EXTENSIONS, to_mode

    source = Path(path)
    if source.suffix.lower() == ".npz" and source.is_file():
        with np.load(source) as npz:
            array = npz[npz.files[0]]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ConfigError(f"{path}: expected a uint8 array (N, H, W, 1 or 3), got {array.dtype} {array.shape}")
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataNotFoundError(f"no images in {path}: write some with `gangen generate --output {path}/`")
        arrays, one_channel, coloured = [], [], []  # the last two: indices of grey-mode files, of RGB ones
        for i, f in enumerate(files):
            with Image.open(f) as im:  # 16-bit grey scaled to 8 bits (convert clipped it at 255), as training reads it
                grey = im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16")
                palette = im.mode in ("P", "PA")
                arrays.append(np.asarray(to_mode(im, 1 if grey else 3, name=str(f))))
            if arrays[-1].shape[:2] != arrays[0].shape[:2]:
                raise ConfigError(_mixed(path, files, arrays, i, 0))
            if grey:
                one_channel.append(i)
            elif not (palette and (arrays[-1] == arrays[-1][..., :1]).all()):  # RGB, or a palette of colours
                coloured.append(i)
        if one_channel and coloured:  # a grey file beside a coloured one: two kinds of samples in one folder
            raise ConfigError(_mixed(path, files, arrays, *sorted((one_channel[0], coloured[0]), reverse=True)))
        if not coloured:  # grey once for the folder: palettes of greys are grey too
            arrays = [a if a.ndim == 2 else a[..., 0] for a in arrays]
        array = np.stack(arrays)
        array = array[..., None] if array.ndim == 3 else array
    elif source.is_file():  # a file, but not one this reads
        kind = f"a {source.suffix} file" if source.suffix else "a file"
        hint = "; a checkpoint goes to --ckpt_path" if source.suffix.lower() in (".ckpt", ".safetensors") else ""
        raise ConfigError(
            f"samples {path!r} is {kind}, not an .npz or a folder: pass a folder of images or an .npz from "
            f"`gangen generate`{hint}"
        )
    else:
        raise DataNotFoundError(
            f"samples {path!r} not found: pass a folder of images or an .npz from `gangen generate`"
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def _mixed(path: str, files: list[Path], arrays: list, later: int, earlier: int) -> str:
    """load_samples' refusal of two images of another size or colour mode, the later one named first."""
    return (
        f"samples {path!r}: {files[later].name} is {_size(arrays[later])} and {files[earlier].name} "
        f"{_size(arrays[earlier])}: every image must have one size and one colour mode (grey or RGB)"
    )


def _size(array) -> str:
    """'32x32 grey' / '64x64 RGB' for an (H, W) or (H, W, 3) uint8 array."""
    return f"{array.shape[1]}x{array.shape[0]} {'RGB' if array.ndim == 3 else 'grey'}"


def evaluate_command(argv: Sequence[str]) -> None:
    """`gangen evaluate --ckpt_path PATH | --samples DIR_OR_NPZ [--data.* ...]`: metrics printed and as JSON."""
    import json

    from jsonargparse import ArgumentParser

    from gangen.decoded import cache_root
    from gangen.inception import make_feature_extractor
    from gangen.metrics import (
        Evaluator,
        check_cache_dir,
        check_evaluate_memory,
        evaluate_generator,
        feature_widths,
        real_statistics,
    )

    p = ArgumentParser(
        prog="gangen evaluate",
        description="FID / KID / IS or a domain FD of a checkpoint or samples. (*) With --ckpt_path, the default "
        "is the run's --metrics.* setting when the checkpoint records it (it prints them).",
        exit_on_error=False,
    )
    p.add_argument("--ckpt_path", type=str | None, default=None, help="gangen checkpoint to generate from")
    p.add_argument("--samples", type=str | None, default=None, help="folder of images or .npz, instead of a ckpt")
    p.add_class_arguments(ImageDataModule, "data", sub_configs=True)
    p.add_argument("--num_samples", type=int, default=10_000, help="images generated from the checkpoint (*)")
    p.add_argument("--feature_extractor", type=str, default="inception", help="inception | classifier path")
    p.add_argument("--inception_weights", type=str | None, default=None, help="Inception weights file")
    p.add_argument("--split", type=str, default="val", help="real split: val or train (*)")
    p.add_argument("--num_real", type=int | None, default=None, help="real images (default: the whole split) (*)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="latent seed of the generated images (*)")
    p.add_argument("--device", type=str, default="cpu", help="cpu | cuda")
    p.add_argument("--cache_dir", type=str | None, default=None, help="real statistics cache")
    p.add_argument(
        "--output",
        type=str | None,
        default=None,
        help="metrics .json file (default: beside the input, <name>.metrics-<extractor>-n<count>.json)",
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt_path", default=None)
    pre.add_argument("--samples", default=None)
    pre.add_argument("--output", default=None)
    known = pre.parse_known_args(list(argv))[0]
    if "-h" not in argv and "--help" not in argv and (known.ckpt_path is None) == (known.samples is None):
        raise ConfigError("pass exactly one of --ckpt_path (generate and evaluate) or --samples (evaluate files)")
    if known.output is not None:  # before the checkpoint is read and the images generated
        _check_json_output(known.output)
    ckpt = read_checkpoint(known.ckpt_path) if known.ckpt_path else None  # read once, used twice
    if ckpt is not None:  # the checkpoint's data settings are the defaults; --data.* still overrides them
        given = any(arg.startswith("--data") for arg in argv)  # a checkpoint without them needs them given
        p.set_defaults({f"data.{k}": v for k, v in _checkpoint_data(ckpt, known.ckpt_path, given).items()})
    run_metrics = _checkpoint_metrics(ckpt) if ckpt is not None else {}
    p.set_defaults(run_metrics)  # and the run's --metrics.* settings, so the rows it wrote are reproduced
    args = p.parse_args(list(argv))
    _usable_device(args.device)
    if args.num_samples < 2:
        raise ConfigError(f"--num_samples {args.num_samples} must be >= 2 (FID needs 2; 10000+ is usual)")
    if args.num_real is not None and args.num_real < 2:
        raise ConfigError(f"--num_real {args.num_real} must be >= 2 (or omit it: the whole split)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size} must be >= 1")
    check_seed(args.seed)  # generate's range: the same seed gives the same images
    check_cache_dir(args.cache_dir, "--cache_dir")
    if args.cache_dir is None:
        cache_root()  # $GANGEN_CACHE_DIR a file: said now, not after the real images went through the extractor
    if run_metrics:
        used = " ".join(f"--{k} {_option_text(v)}" for k, v in run_metrics.items())
        changed = [f"--{k} {_option_text(getattr(args, k))}" for k, v in run_metrics.items() if getattr(args, k) != v]
        instead = f"; given instead: {' '.join(changed)}" if changed else ""
        print(f"gangen: the run's metrics settings (from the checkpoint): {used}{instead}")
    source = Path(args.ckpt_path or args.samples)
    samples = load_samples(args.samples) if args.samples else None  # (N, C, H, W) uint8
    generator = load_generator(ckpt, args.device, source=args.ckpt_path) if ckpt is not None else None  # checked early
    datamodule = p.instantiate_classes(args).data
    extractor = make_feature_extractor(
        args.feature_extractor, args.inception_weights, device=args.device, option="--inception_weights PATH"
    )
    if generator is not None:  # before the real images' pass, which can take minutes
        widths = feature_widths(generator, extractor)
        check_evaluate_memory(generator.latent_dim, widths, args.num_samples, option="--num_samples")
    count = args.num_samples if samples is None else len(samples)
    seed = args.seed if args.ckpt_path else None  # samples given: no latents drawn
    output = Path(args.output or _default_output(source, extractor.name, count, args.split, seed, args.num_real))
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
        results = evaluate_generator(generator, args.num_samples, real, extractor, args.batch_size, args.seed)
    record = {"source": str(source), "real_split": args.split, "num_real_requested": args.num_real}
    if ckpt is not None:  # the generator evaluate_generator measured (its results hold latent_seed)
        record["ema"] = any(str(k).startswith("generator_ema.") for k in ckpt["state_dict"])
    results = {**record, "real_from_cache": real.from_cache, **results}
    text = json.dumps(results, indent=2)
    atomic_file(output, lambda tmp: Path(tmp).write_text(text + "\n"))  # never a half-written file
    print(text)
    print(f"wrote {output}")


def _default_output(
    source: Path, extractor: str, count: int, split: str, seed: int | None, num_real: int | None
) -> Path:
    """evaluate's JSON beside its input, named after it: `<name>.metrics-<extractor>-n<count>.json`, with the
    split, the latent seed and the real count where they are not the defaults (val, 0, the whole split).

    The input's full name leads: with the stem, last.ckpt, last.npz and last.safetensors in one folder wrote one
    file, and the second result replaced the first (as a.npz and b.npz did with no name at all). A folder given
    as `.` or `..` is named by its absolute path's last part (`.` gave a hidden `.metrics-....json`)."""
    if source.name in ("", ".."):
        source = Path(os.path.abspath(source))  # normalised, links not followed: the folder the user named
    extras = ("" if split == "val" else f"-{split}") + ("" if seed in (None, 0) else f"-seed{seed}")
    extras += "" if num_real is None else f"-real{num_real}"
    return source.parent / f"{source.name or 'samples'}.metrics-{extractor}-n{count}{extras}.json"


def _check_json_output(output: str) -> None:
    """evaluate's --output: a .json file it can write (evaluate writes JSON only; m.png got JSON in a .png)."""
    check_output_file(output, example="metrics.json")
    if Path(output).suffix.lower() != ".json":
        example = Path(output).with_suffix(".json")
        raise ConfigError(f"--output {output!r}: evaluate writes JSON; end it with .json (e.g. {example})")


_RUN_METRICS = {"num_samples": "num_samples", "seed": "seed", "split": "real_split", "num_real": "num_real"}


def _checkpoint_metrics(ckpt: dict) -> dict:
    """evaluate's --num_samples, --seed, --split and --num_real as the run's --metrics.* settings (GANMetrics'
    state in the checkpoint, or an export's copy); {} where it holds none (an older gangen, a fit without
    GANMetrics)."""
    settings = metrics_settings(ckpt)
    return {option: settings[name] for option, name in _RUN_METRICS.items() if name in settings}


def _option_text(value: object) -> str:
    return "null" if value is None else str(value)


def _checkpoint_data(ckpt: dict, ckpt_path: str, given: bool = False) -> dict:
    """The data settings a gangen checkpoint was trained with (its datamodule hyperparameters); a checkpoint
    without them (trained from Python without a datamodule) needs --data.* given."""
    data = checkpoint_data(ckpt)
    if not data and not given:
        raise ConfigError(f"{ckpt_path} does not record its data: pass --data.dataset ... --data.resolution ...")
    return data


def download_weights_command(argv: Sequence[str]) -> None:
    from gangen.inception import INCEPTION_FILENAME, INCEPTION_URL, download_inception_weights, hub_cache_path

    p = _OneLineParser(prog="gangen download-weights", description="Fetch the FID Inception weights (network).")
    p.add_argument("--dest", default=None, help=f"file to write (default: {hub_cache_path()})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up (default %(default)g)")
    args = p.parse_args(argv)
    if not 0 < args.timeout < float("inf"):  # 0 makes every socket non-blocking, a negative one is refused late
        raise ConfigError(f"--timeout {args.timeout:g} must be a finite number of seconds > 0 (default 30)")
    dest = str(Path(args.dest).expanduser()) if args.dest is not None else str(hub_cache_path())
    check_output_file(dest, "--dest", INCEPTION_FILENAME, parents=True)  # said before connecting, not after
    path = download_inception_weights(dest, timeout=args.timeout)
    print(f"downloaded {INCEPTION_URL} to {path}")


def export_command(argv: Sequence[str]) -> None:
    from gangen.sampling import export_safetensors

    p = _OneLineParser(prog="gangen export", description="Write a checkpoint's generator as .safetensors.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `gangen fit`")
    p.add_argument("--output", required=True, help="generator.safetensors (config as JSON in its metadata)")
    p.add_argument("--no_ema", action="store_true", help="export the trained generator even if there is an EMA one")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output {args.output!r}: end it with .safetensors")
    check_output_file(args.output, example="generator.safetensors")
    ckpt = read_checkpoint(args.ckpt_path)
    path, is_ema = export_safetensors(ckpt, output, ema=not args.no_ema, source=f"checkpoint {args.ckpt_path!r}")
    print(f"wrote the {'EMA ' if is_ema else ''}generator of {args.ckpt_path} to {path}")


def cache_command(argv: Sequence[str]) -> None:
    from gangen import cache_dir
    from gangen.decoded import cache_root

    root = cache_root(check=False)  # for the help text; checked below where it is used
    about = "List gangen's caches (decoded datasets, real-image statistics), or remove them."
    p = _OneLineParser(prog="gangen cache", description=about)
    p.add_argument("folders", nargs="*", type=Path,
                   help=f"where to look (default: {root / 'decoded'} and {root / 'real_stats'}; add any "
                   "--data.cache_dir or --metrics.cache_dir you used; a cache root stands for its decoded/ and "
                   "real_stats/)")  # fmt: skip
    p.add_argument("--clean", action="store_true", help="remove them (unfinished builds once untouched for an hour)")
    p.add_argument("--unused_days", type=float, default=0.0, help="only the entries not used for this many days")
    args = p.parse_args(argv)
    cache_dir.check_days(args.unused_days)
    default = [cache_root() / "decoded", cache_root() / "real_stats"]
    folders = [sub for f in args.folders for sub in _cache_folders(f)] or default
    where = ", ".join(str(f) for f in folders)
    chosen = [e for e in cache_dir.entries(folders) if e.age_s >= args.unused_days * 86400]
    if not args.clean:
        for entry in chosen:
            print(cache_dir.describe(entry))
        total = cache_dir.human(sum(e.size for e in chosen))
        print(f"{len(chosen)} entries, {total} in {where}" if chosen else f"no gangen caches in {where}")
        return
    removed = [e for e in chosen if cache_dir.removable(e, args.unused_days)]
    for entry in removed:
        cache_dir.remove(entry)
        print(f"removed {entry.path} ({cache_dir.human(entry.size)})")
    busy = len(chosen) - len(removed)
    note = f"; kept {busy} unfinished written in the last hour (a build may be running)" if busy else ""
    print(f"removed {len(removed)} entries, {cache_dir.human(sum(e.size for e in removed))} freed in {where}{note}")


def _cache_folders(folder: Path) -> list[Path]:
    """A folder `gangen cache` was given: a cache root ($GANGEN_CACHE_DIR, ~/.cache/gangen) stands for its
    decoded/ and real_stats/ (its entries are there: it said "removed 0 entries" about a full cache); any
    other folder (a --data.cache_dir or --metrics.cache_dir) for itself."""
    subfolders = [folder / name for name in ("decoded", "real_stats") if (folder / name).is_dir()]
    return subfolders or [folder]


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "cache": cache_command,
    "evaluate": evaluate_command,
    "export": export_command,
    "download-weights": download_weights_command,
    "generate": generate_command,
    "train-classifier": train_classifier_command,
}

"""Generating images: latents, batched generation, grids, PNG folders, npz, interpolation strips.

Shared by the CLI's `generate` command and the sample-grid callback. Writers are atomic: output goes to a
temporary name in the target folder and is renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from gangen.cache_dir import creation_mode
from gangen.errors import ConfigError, DataNotFoundError, DivergenceError
from gangen.networks import build_network


def check_seed(seed: Any, option: str = "--seed") -> None:
    """ConfigError unless `seed` is an int a latent stream takes: 0 to 2**64 - 1 (generate, evaluate, metrics)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"{option} {seed!r} is out of range: use 0 to 2**64 - 1")


def latents(num_samples: int, latent_dim: int, seed: int = 0) -> torch.Tensor:
    """(N, latent_dim) standard normal latents, drawn on the CPU so a seed gives the same z on any device.

    Latent i does not depend on N: rows are drawn in blocks of 16 (torch's CPU sampler draws the last values
    of a tensor whose size is not a multiple of 16 differently, so randn(10, D)[9] != randn(50, D)[9])."""
    rows = -(-num_samples // 16) * 16
    if not -(2**63) <= seed < 2**64:
        raise ConfigError(f"seed {seed} is out of range: use 0 to 2**64 - 1")
    return torch.randn(rows, latent_dim, generator=torch.Generator().manual_seed(seed))[:num_samples]


@contextmanager
def full_float32() -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA: cuDNN defaults to TF32 convolutions on Ampere and later (10
    mantissa bits), which moved generated images and features by ~1e-3 relative against the CPU, enough to flip
    uint8 pixels and so an FID between cards. Sampling and the feature extractors run inside it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def generate(
    generator: nn.Module,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 256,
    z: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    label_offset: int = 0,
    uint8: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] on the CPU, from `z` or from latents drawn with `seed`.

    Runs the generator in eval mode (batchnorm uses its running statistics) on the device its parameters
    are on, and restores its previous mode. `labels` (N,) picks the classes of a conditional generator;
    default: image i gets class (label_offset + i) % num_classes, over the whole set, so every class comes
    equally often and an image's class does not depend on batch_size (or, with each rank's offset, on how
    many processes share the set). `uint8`: each batch is converted as `to_uint8` does (clamped, rounded)
    as it comes, so a large set takes 1 byte per value instead of 4. `check_finite`: a NaN or inf image is
    a DivergenceError (uint8 would write it black); training's grids and metrics leave that to its own
    divergence check, which stops every DDP rank at once.
    """
    if num_samples <= 0:
        raise ConfigError(f"num_samples {num_samples!r} must be > 0")
    if batch_size <= 0:
        raise ConfigError(f"batch_size {batch_size!r} must be > 0")
    if z is None:
        z = latents(num_samples, generator.latent_dim, seed)
    elif len(z) < num_samples:
        raise ConfigError(f"z holds {len(z)} latents for num_samples {num_samples}: pass as many as num_samples")
    classes = int(getattr(generator, "num_classes", 0) or 0)
    if labels is not None and not classes:
        raise ConfigError("labels were passed to an unconditional generator (num_classes 0): drop them")
    if labels is not None and len(labels) < num_samples:
        raise ConfigError(f"labels holds {len(labels)} classes for num_samples {num_samples}: pass one per image")
    if labels is None and classes:
        labels = (label_offset + torch.arange(num_samples)) % classes  # (N,)
    param = next(generator.parameters())
    convert = _uint8_nchw if uint8 else (lambda x: x.float().cpu())  # noqa: E731
    out = None  # (N, C, H, W), filled batch by batch: no list of batches to concatenate
    nonfinite = torch.zeros((), dtype=torch.long, device=param.device)  # images with a NaN or inf, on the device
    was_training = generator.training
    generator.eval()
    try:
        with full_float32():  # the same images on any card (TF32 flipped uint8 pixels)
            for start in range(0, num_samples, batch_size):
                zb = z[start : start + batch_size].to(param.device, param.dtype)
                if labels is None:
                    raw = generator(zb)
                else:
                    raw = generator(zb, labels[start : start + batch_size].to(param.device))
                if check_finite:
                    nonfinite += (~torch.isfinite(raw)).flatten(1).any(1).sum()
                images = convert(raw)
                if out is None:
                    out = torch.empty((num_samples, *images.shape[1:]), dtype=images.dtype)
                out[start : start + len(images)] = images
    finally:
        generator.train(was_training)
    if check_finite and nonfinite.item():  # uint8 would turn NaN into black pixels, FID would score them
        raise DivergenceError(
            f"the generator produced NaN or inf in {nonfinite.item()} of {num_samples} images: its weights have "
            "diverged; use an earlier checkpoint"
        )
    return out


def _uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) floats in [-1, 1] -> uint8 (N, C, H, W) on the CPU, clamped and rounded (not truncated)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a, b (D,) at fractions t (K,) -> (K, D)."""
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if omega.abs() < 1e-6:
        return torch.lerp(a[None], b[None], t[:, None])
    t = t[:, None]
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def interpolation_latents(rows: int, steps: int, latent_dim: int, seed: int = 0) -> torch.Tensor:
    """(rows * steps, latent_dim): each row walks by slerp between two random latents."""
    if steps < 2:
        raise ConfigError(f"--interpolate {steps!r} must be >= 2 (images per interpolation strip)")
    ends = latents(2 * rows, latent_dim, seed)
    t = torch.linspace(0, 1, steps)
    return torch.cat([slerp(ends[2 * r], ends[2 * r + 1], t) for r in range(rows)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] (or uint8 from generate(uint8=True)) -> (N, H, W, C) uint8, clamped and
    rounded (not truncated)."""
    x = images.cpu() if images.dtype == torch.uint8 else _uint8_nchw(images)
    return x.permute(0, 2, 3, 1).numpy()


def grid_image(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] (or uint8) -> one (C', H', W') image in [-1, 1] with a 2-pixel border."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1  # back to [-1, 1]: the uint8 values round-trip exactly
    grid = make_grid(images.float(), nrow=nrow, padding=2, pad_value=-1.0)  # (3, H', W') for 1 or 3 channels
    return grid[: images.shape[1]]  # greyscale stays one channel


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)  # (H, W, C) uint8


def atomic_file(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename tmp_path to `path` (same folder, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, creation_mode(0o666))  # readable as any file the user writes, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def grid_pixels(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (or uint8) -> the grid image as (H', W', C) uint8, as save_grid writes it."""
    return to_uint8(grid_image(images, nrow)[None])[0]


def save_pixels(array: np.ndarray, path: str | Path) -> Path:
    """Write one (H, W, C) uint8 image atomically, in the format its suffix names."""
    path = Path(path)
    atomic_file(path, lambda tmp: _pil(array).save(tmp, format=_image_format(path)))
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    return save_pixels(grid_pixels(images, nrow), path)


_GRID_LIMITS = {"PNG": ("PNG", 2**31 - 1), "JPEG": ("JPEG", 65500), "WEBP": ("WebP", 16383)}  # px per side


def check_grid_size(output: str, count: int, nrow: int, image_shape: Sequence[int]) -> None:
    """ConfigError if a grid of `count` images of (C, H, W) `image_shape`, `nrow` a row, is wider or taller than
    the format of `output` allows (PIL fails only when it writes, with a line of its own on stderr)."""
    (fmt, limit), (height, width) = _GRID_LIMITS[_image_format(Path(output))], image_shape[-2:]
    per_row = min(nrow, count)
    rows = -(-count // per_row)
    grid_w, grid_h = per_row * (width + 2) + 2, rows * (height + 2) + 2  # make_grid's 2-pixel borders
    if grid_w > limit:
        raise ConfigError(
            f"--nrow {nrow}: a row of {per_row} images is {grid_w} px wide and {fmt} allows {limit}: lower --nrow "
            f"(at most {(limit - 2) // (width + 2)} here)"
        )
    if grid_h > limit:
        raise ConfigError(
            f"--output {output!r}: {rows} rows of {per_row} images make a grid {grid_h} px tall and {fmt} allows "
            f"{limit}: raise --nrow, write fewer samples, or write a folder DIR/ or an .npz"
        )


def check_generate_size(
    what: str, output: str, kind: str, count: int, image_shape: Sequence[int], latent_dim: int
) -> None:
    """ConfigError when `count` images of (C, H, W) `image_shape` cannot be written here. generate() holds them all
    in memory at once with their latents (float32): uint8 for an npz or a folder, float32 for a grid, plus the grid
    itself (3 channels, float32); that must fit in the memory this process may use (`usable_memory`). An npz
    (uncompressed) must fit in its folder's free disk space. Both counts are lower bounds: only what cannot fit is
    refused. `what` names the request."""
    from gangen.cache_dir import human, usable_memory

    values = math.prod(image_shape)  # C * H * W
    per_image = 4 * latent_dim + (4 * values + 12 * math.prod(image_shape[-2:]) if kind == "grid" else values)
    shape = "x".join(str(n) for n in image_shape) + (" float32" if kind == "grid" else " uint8")
    usable = usable_memory()
    if usable is not None and count * per_image > usable[0]:
        raise ConfigError(
            f"{what}: generate holds all {count} images ({shape}) and their latents in memory, about "
            f"{human(count * per_image)}, more than {usable[1]}: lower --num_samples (at most about "
            f"{usable[0] // per_image} images fit), or run generate several times with different --seed values"
        )
    if kind == "npz":
        parent = Path(output).absolute().parent
        free = shutil.disk_usage(parent).free
        if count * values > free:
            raise ConfigError(
                f"--output {output!r}: {count} images of {shape} make an npz of about {human(count * values)} and "
                f"{parent} has {human(free)} free: lower --num_samples (at most about {free // values} images fit), or "
                "write it to another disk"
            )


def save_png_folder(images: torch.Tensor, folder: str | Path) -> Path:
    """One PNG per sample, 000000.png, 000001.png, ... The folder must not already hold PNGs."""
    folder = Path(folder)
    check_png_folder(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    moved: list[Path] = []
    try:
        tmp.chmod(creation_mode(0o777))  # a folder as mkdir makes it, not mkdtemp's 0700
        for i, array in enumerate(to_uint8(images)):
            _pil(array).save(tmp / f"{i:06d}.png")
        if folder.exists():  # an existing empty folder: move the files in (taken out again on failure)
            for f in sorted(tmp.iterdir()):
                moved.append(folder / f.name)
                os.replace(f, moved[-1])
            tmp.rmdir()
        else:
            os.replace(tmp, folder)
    except BaseException:
        for f in moved:
            f.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """uint8 array (N, H, W, C) under the key arr_0, the layout FID tools read; a conditional model's classes
    (N,) int64 under arr_1, as guided-diffusion's sample files hold them."""
    path = Path(path)
    arrays = [to_uint8(images)]
    if labels is not None:
        arrays.append(labels.to(torch.int64).numpy())
    atomic_file(path, lambda tmp: _savez(tmp, arrays))
    return path


def _savez(tmp: str, arrays: list[np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez appends .npz to any name not ending in lower-case .npz
        np.savez(f, *arrays)


_IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _image_format(path: Path) -> str:
    return _IMAGE_SUFFIXES[path.suffix.lower()]


def output_kind(output: str) -> str:
    """'grid' (.png/.jpg/.webp), 'npz' (.npz) or 'folder' (ends with / or is a folder); else ConfigError."""
    path = Path(output)
    if not output.strip():  # an unset shell variable: it meant the current folder
        raise ConfigError("--output '' is empty: pass grid.png, grid.jpg, out.npz or a folder DIR/")
    if path.is_dir() and not output.endswith(("/", os.sep)) and path.suffix.lower() in (*_IMAGE_SUFFIXES, ".npz"):
        raise ConfigError(
            f"--output {output!r} is a folder: pass {output}/ to write one PNG per image into it, or a new file name"
        )
    if output.endswith(("/", os.sep)) or path.is_dir():
        kind = "folder"
        parent = path.parent
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {output!r}: {path} is a file, not a folder; choose a new or empty folder")
        check_png_folder(path)
    elif path.suffix.lower() in _IMAGE_SUFFIXES:
        kind, parent = "grid", path.parent
    elif path.suffix.lower() == ".npz":
        kind, parent = "npz", path.parent
    else:
        raise ConfigError(
            f"--output {output!r}: end it with .png/.jpg (grid), .npz (uint8 array) or / (one PNG per sample)"
        )
    check_output_folder(output, parent)
    return kind


def check_png_folder(folder: Path) -> None:
    """ConfigError if `folder` already holds PNGs (of another run: files would mix)."""
    if folder.is_dir() and any(folder.glob("*.png")):
        raise ConfigError(f"output folder {folder} already holds PNG files: choose an empty or new folder")


def check_output_folder(output: str, parent: Path, option: str = "--output") -> None:
    """ConfigError unless `parent` exists and a file can really be created in it."""
    if not parent.is_dir():
        raise ConfigError(f"{option} {output!r}: folder {parent} does not exist; create it first")
    problem = write_problem(parent)
    if problem:
        raise ConfigError(f"{option} {output!r}: folder {parent} is not writable ({problem}); choose another location")


def check_output_file(output: str, option: str = "--output", example: str = "out.pt", parents: bool = False) -> None:
    """ConfigError unless a file can be written at `output`: a name given, not a folder, in a writable folder
    (`parents`: missing folders will be made, in the nearest existing one). Checked before the work that
    produces the file (training, a download), not after it."""
    path = Path(output)
    if not output.strip():
        raise ConfigError(f"{option} '' is empty: pass a file name such as {example}")
    if path.is_dir():
        raise ConfigError(f"{option} {output!r} is a folder: pass a file name (e.g. {path / example})")
    if output.endswith(("/", os.sep)):  # Path drops the slash: it would write the file `path`
        instead = path if path.suffix else path / example
        raise ConfigError(f"{option} {output!r} ends with '/', which names a folder: pass a file name (e.g. {instead})")
    parent = next((p for p in path.absolute().parents if p.exists()), path.parent) if parents else path.parent
    if parents and not parent.is_dir():
        raise ConfigError(f"{option} {output!r}: {parent} is a file, not a folder; choose another location")
    check_output_folder(output, parent, option)


def write_problem(folder: Path) -> str | None:
    """Why no file can be created in the existing `folder` (the OS's reason), or None. Tried, not asked of
    os.access: root ignores permissions, a read-only filesystem does not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A gangen checkpoint as a dict, loaded with weights_only=True (a .safetensors from `gangen export` too);
    one-line errors for missing, corrupt, unsafe or foreign files."""
    from gangen.reliability import find_last_checkpoint, safe_load

    path = Path(ckpt_path)
    if path.is_dir():  # a run folder or its checkpoints/ folder: name the file meant
        found = find_last_checkpoint([path]) or path / "checkpoints" / "last.ckpt"
        raise ConfigError(f"checkpoint {str(path)!r} is a folder: pass the .ckpt file (e.g. {found})")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    ckpt = safe_load(path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(hparams, dict) or not isinstance(hparams.get("generator"), dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{str(path)!r} is not a gangen checkpoint (no generator config): pass one from `gangen fit`")
    if not any(str(k).startswith(("generator.", "generator_ema.")) for k in ckpt["state_dict"]):
        raise ConfigError(
            f"checkpoint {str(path)!r} holds no generator weights (a damaged or hand-edited file): pass a "
            "checkpoint from `gangen fit`"
        )
    return ckpt


def generator_state(
    ckpt: dict[str, Any], ema: bool = True, source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], bool]:
    """The generator's state_dict from a checkpoint dict: the EMA generator's if it has one (and ema), else the
    trained one's; and whether it is the EMA's. `source` names the file in errors."""
    for prefix in ("generator_ema.", "generator.") if ema else ("generator.",):
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if state:
            return state, prefix == "generator_ema."
    if any(k.startswith("generator_ema.") for k in ckpt["state_dict"]):
        raise ConfigError(
            f"{source} holds the EMA generator only (an export of it): drop --no_ema, or export the trained one "
            "with `gangen export --no_ema`"
        )
    raise ConfigError(f"{source} holds no generator weights: pass a checkpoint from `gangen fit`")


def check_weights(module: nn.Module, state: dict[str, Any], source: str, prefix: str = "") -> None:
    """ConfigError unless `state` loads into `module` as it is (the same names and shapes). `module` is built
    from the file's own config, so a mismatch means a damaged file or another gangen version's; `prefix` is the
    weights' prefix in the file (generator.), so the message names the key the file holds."""
    expected = module.state_dict()
    problems = [
        f"size mismatch for {prefix}{k}: {tuple(getattr(state[k], 'shape', ()))} in the file, the config "
        f"makes {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and getattr(state[k], "shape", None) != v.shape
    ]
    problems += [f"{prefix}{k} missing" for k in expected if k not in state]
    problems += [f"unexpected {prefix}{k}" for k in state if k not in expected]
    if problems:
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ConfigError(
            f"{source}: its weights do not match its own network config ({problems[0]}{more}): the file is "
            "damaged or from another gangen version"
        )


def checkpoint_data(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The data settings a checkpoint was trained with (its datamodule hyperparameters; {} if none)."""
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    data.pop("_instantiator", None)
    return data


def metrics_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The --metrics.* settings the run measured with (num_samples, seed, real_split, num_real): GANMetrics' state
    in a checkpoint, or an export's copy of it; {} where there are none (an older gangen, a fit without metrics)."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        settings = state.get("settings") if str(key).startswith("GANMetrics") and isinstance(state, dict) else None
        if isinstance(settings, dict):
            return dict(settings)
    settings = (ckpt.get("gangen") or {}).get("metrics_settings")
    return dict(settings) if isinstance(settings, dict) else {}


def export_safetensors(
    ckpt: dict[str, Any], output: str | Path, ema: bool = True, source: str = "the checkpoint"
) -> tuple[Path, bool]:
    """Write the generator (EMA if present) as safetensors; its network spec, data settings and the run's metrics
    settings go in the metadata as JSON; its weights must match that spec. Atomic: nothing is left at `output` on
    failure. `source` names the file in errors."""
    import json

    from safetensors.torch import save_file

    state, is_ema = generator_state(ckpt, ema, source)
    check_weights(build_network(ckpt["hyper_parameters"]["generator"]), state, source, _prefix(is_ema))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        "format": "gangen.generator/1",
        "generator": json.dumps(ckpt["hyper_parameters"]["generator"]),
        "data": json.dumps(checkpoint_data(ckpt)),
        "ema": json.dumps(is_ema),
        "images_seen": json.dumps(int((ckpt.get("gangen") or {}).get("images_seen", 0))),
    }
    if settings := metrics_settings(ckpt):  # evaluate of the export measures as the run's rows did
        metadata["metrics_settings"] = json.dumps(settings)
    path = Path(output)
    atomic_file(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path, is_ema


def read_safetensors(path: Path) -> dict[str, Any]:
    """A file from export_safetensors as a checkpoint-like dict (hyper_parameters.generator, state_dict)."""
    import json

    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DataNotFoundError(f"generator file {str(path)!r} not found: write one with `gangen export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            prefix = "generator_ema." if json.loads(metadata.get("ema", "false")) else "generator."  # as exported
            state = {prefix + k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        spec = json.loads(metadata["generator"])
        data = json.loads(metadata.get("data", "{}"))
        images_seen = int(json.loads(metadata.get("images_seen", "0")))
        settings = json.loads(metadata.get("metrics_settings", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{str(path)!r} is not a generator file from `gangen export` ({first[:200]}): export one again"
        ) from None
    return {
        "hyper_parameters": {"generator": spec},
        "state_dict": state,
        "datamodule_hyper_parameters": data,
        # a re-export keeps these, and the EMA flag (the weights' prefix)
        "gangen": {"images_seen": images_seen, **({"metrics_settings": settings} if settings else {})},
    }


def load_generator(
    ckpt: str | Path | dict[str, Any], device: str | torch.device = "cpu", ema: bool = True, source: str | None = None
) -> nn.Module:
    """The generator of a gangen checkpoint (a path, or a dict from read_checkpoint), in eval mode, on `device`.

    The EMA generator's weights (`generator_ema.*`) are used when the checkpoint has them, unless ema=False.
    Non-finite weights are a DivergenceError naming the file (`source`: its path when `ckpt` is a dict).
    """
    source = f"checkpoint {str(source or ckpt)!r}" if source or not isinstance(ckpt, dict) else "the checkpoint"
    ckpt = ckpt if isinstance(ckpt, dict) else read_checkpoint(ckpt)
    generator = build_network(ckpt["hyper_parameters"]["generator"])
    state, is_ema = generator_state(ckpt, ema, source)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DivergenceError(
            f"{source}: its {'EMA ' if is_ema else ''}generator holds nan/inf in {bad[0]}{more} (the run diverged): "
            "use an earlier checkpoint"
        )
    check_weights(generator, state, source, _prefix(is_ema))
    generator.load_state_dict(state)
    return generator.to(device).eval()


def _prefix(is_ema: bool) -> str:
    return "generator_ema." if is_ema else "generator."

"""The Inception network behind FID, KID and IS: its weights file and the feature extractors.

- `resolve_inception_weights(path)`: explicit path, else $GANGEN_INCEPTION_WEIGHTS, else torch hub's cache
  file (`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`, where torch-fidelity puts
  it), else one-line DataNotFoundError. Nothing is downloaded implicitly; `download_inception_weights()` is
  the explicit fetch behind `gangen download-weights`.
- `make_feature_extractor("inception", weights)`: one extractor shared by all three metrics, so every image
  goes through Inception once. An extractor maps uint8 images (N, C, H, W) to named features: "pool"
  (FID / KID) and optionally "logits" (IS). A domain classifier (`fd_<name>`) plugs in by returning "pool".
- `write_random_inception_weights(path)`: a file of the same architecture with random values, for tests and
  benchmarks on machines without the real file.

The extractor is torch-fidelity's `FeatureExtractorInceptionV3` ("inception-v3-compat"), the network
torch-fidelity runs and the base class of torchmetrics' `NoTrainInceptionV3` (see metrics.py for why, and for
its two float32-rounding-level departures: channels_last, and no TF32 on CUDA).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import math
import os
import re
import urllib.request
import zipfile
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from gangen.errors import ConfigError, DataNotFoundError
from gangen.sampling import atomic_file, full_float32

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# the URL torch-fidelity (and torchmetrics through it) downloads from: URL_INCEPTION_V3 in its source
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
ENV_VAR = "GANGEN_INCEPTION_WEIGHTS"  # path of the Inception weights file
_OPTION = "--metrics.inception_weights PATH"


# ---------------------------------------------------------------- weights
def hub_cache_path() -> Path:
    """Where torch-fidelity caches the weights: $TORCH_HOME/hub/checkpoints/<filename> (read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(path: str | Path | None = None, option: str = _OPTION) -> Path:
    """The Inception weights file: `path`, else $GANGEN_INCEPTION_WEIGHTS, else the torch hub cache file.
    `option`: how the caller's command line passes a path (named in the error)."""
    for given, origin in ((path, "inception_weights"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            file = Path(given).expanduser()
            if not file.is_file():
                raise DataNotFoundError(
                    f"Inception weights {str(file)!r} (from {origin}) not found: pass an existing file "
                    f"({INCEPTION_FILENAME} from {INCEPTION_URL}), or run `gangen download-weights`"
                )
            return file
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    raise DataNotFoundError(
        f"Inception weights not found: pass {option} or set {ENV_VAR}=PATH, or put {INCEPTION_URL} at "
        f"{cached} (`gangen download-weights` does that on a machine with network)"
    )


def download_inception_weights(dest: str | Path | None = None, timeout: float = 30, url: str = INCEPTION_URL) -> Path:
    """Fetch the weights to `dest` (default: the torch hub cache file), atomically, checking the sha256 prefix.

    An existing file with the right hash is kept. Network failures raise a one-line DataNotFoundError and
    leave no partial file.
    """
    dest = Path(dest).expanduser() if dest is not None else hub_cache_path()
    expected = re.search(r"-([0-9a-f]{8,})\.", url.rsplit("/", 1)[-1])  # torch hub's <name>-<sha256 prefix>.pth
    if dest.is_file() and (expected is None or file_sha256(dest).startswith(expected.group(1))):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        digest = file_sha256(Path(tmp))
        if expected is not None and not digest.startswith(expected.group(1)):
            raise ConfigError(f"download of {url} is corrupt (sha256 {digest[:12]}...): retry")

    try:
        atomic_file(dest, fetch)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused connections, disk errors
        reason = getattr(err, "reason", None) or err
        raise DataNotFoundError(
            f"download of {url} failed ({reason}): check the network, or fetch the file elsewhere and pass "
            f"{_OPTION} (or ${ENV_VAR})"
        ) from None
    return dest


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> hex digest


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def check_inception_weights(path: Path, origin: str = "Inception weights") -> None:
    """ConfigError unless `path` holds exactly the tensor names and shapes of torch-fidelity's InceptionV3.

    Reads names and shapes only (memory-mapped: ~30 ms for the 96 MB file), so a wrong file is refused before
    training, and with weights_only=True, before torch-fidelity unpickles it in full (weights_only=False).
    `origin`: how the user gave the path (named in the error), e.g. "--metrics.inception_weights".
    """
    try:  # mmap needs torch's zip format; an older (legacy) torch file is read in full
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # unpickling errors of a foreign or truncated file
        first = (str(err).strip().splitlines() or [""])[0][:120]
        problem = f"torch.load failed: {type(err).__name__}" + (f": {first}" if first else "")
    else:
        problem = _state_problem(state)
    if problem:
        raise ConfigError(
            f"{origin} {path} is not an InceptionV3 state_dict as torch-fidelity saves it ({problem}): "
            f"pass {INCEPTION_FILENAME} (`gangen download-weights` fetches it)"
        )


def _state_problem(state: object) -> str:
    """What keeps `state` from loading into torch-fidelity's InceptionV3 (strict), or ""."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        return f"a {type(state).__name__}, not a dict of tensors"
    expected = _inception_shapes()
    missing = [name for name in expected if name not in state]
    if missing:
        return f"{len(missing)} of the {len(expected)} tensors missing, e.g. {missing[0]}"
    extra = [name for name in state if name not in expected]
    if extra:
        return f"unexpected tensor {extra[0]}"
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            return f"{name} has shape {tuple(state[name].shape)}, not {shape}"
    return ""


@functools.cache
def _inception_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of torch-fidelity's InceptionV3: torchvision's with 1008 classes, no aux head
    (write_random_inception_weights saves that and torch-fidelity loads it strictly)."""
    from torchvision.models import inception_v3

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


# ---------------------------------------------------------------- feature extractors
class FeatureExtractor(Protocol):
    """uint8 images -> named features. "pool" (N, D) feeds FID and KID; "logits" (N, K), if given, feeds IS."""

    name: str  # "inception", or "fd_<name>" for a domain classifier (its metrics are never called FID)
    weights: Path  # the file the extractor was loaded from
    weights_sha256: str
    device: torch.device

    def features(self, images: Tensor) -> dict[str, Tensor]: ...


class InceptionExtractor:
    """torch-fidelity's InceptionV3: "pool" = 2048-d pool3 features, "logits" = logits_unbiased (1008)."""

    name = "inception"

    def __init__(self, weights: Path, device: str | torch.device = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights, self.device = Path(weights), torch.device(device)
        self.weights_sha256 = file_sha256(self.weights)
        if self.weights.name == INCEPTION_FILENAME and not self.weights_sha256.startswith("6726825d"):
            raise ConfigError(f"{self.weights} is corrupt (sha256 {self.weights_sha256[:8]}): delete it and re-fetch")
        check_inception_weights(self.weights)  # torch-fidelity loads with weights_only=False: a foreign file first
        default_dtype = torch.get_default_dtype()  # float32 layers even inside a "*-true" precision context
        torch.set_default_dtype(torch.float32)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], self.weights)
        except Exception as err:  # unpickling / state_dict mismatch errors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ConfigError(
                f"{self.weights} is not an InceptionV3 state_dict as torch-fidelity saves it ({first}): "
                f"pass {INCEPTION_FILENAME}"
            ) from None
        finally:
            torch.set_default_dtype(default_dtype)
        # channels_last: 1.45x faster on CPU (oneDNN); features move by float32 rounding (~1e-6 relative)
        self.net.to(self.device, memory_format=torch.channels_last)

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 (N, 1 or 3, H, W) -> {"pool": (N, 2048), "logits": (N, 1008)} float32 on self.device."""
        images = check_uint8(images).to(self.device, non_blocking=True)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # greyscale as RGB, as PIL's convert("RGB")
        with torch.autocast(self.device.type, enabled=False), full_float32():
            pool, logits = self.net(images)  # resized to 299 inside, like torch-fidelity
        return {"pool": pool, "logits": logits}


def check_uint8(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(
            f"metrics take uint8 images (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
            f"{tuple(getattr(images, 'shape', ()))}: convert [-1, 1] floats with gangen.sampling.to_uint8"
        )
    if images.shape[1] not in (1, 3):
        raise ConfigError(f"metrics take 1 or 3 channels, got images of shape {tuple(images.shape)}")
    return images


EXTRACTORS = ("inception",)


def make_feature_extractor(
    spec: str = "inception",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    option: str = _OPTION,
) -> FeatureExtractor:
    """The feature extractor named by `spec`: "inception" (weights resolved by resolve_inception_weights) or
    the path of a domain classifier saved by `gangen train-classifier` (metrics named fd_<file stem>)."""
    if spec == "inception":
        return InceptionExtractor(resolve_inception_weights(weights, option), device)
    if spec.endswith((".pt", ".pth", ".ckpt")) or Path(spec).exists():  # a domain classifier file (a folder: said)
        from gangen.classifier import ClassifierExtractor

        return ClassifierExtractor(spec, device)
    raise ConfigError(
        f"unknown feature extractor {spec!r}: use one of {', '.join(EXTRACTORS)} or the path of a classifier "
        "from `gangen train-classifier`"
    )


# ---------------------------------------------------------------- test weights
def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A state_dict with the Inception architecture torch-fidelity loads and random values (tests, benchmarks).

    He-normal convolutions and batchnorm at mean 0 / var 1 give features of std ~0.2 that separate image
    sets (PyTorch's default init gives ~1e-8 and every FID ~0); fc ~ N(0, 1), zero bias.
    Numbers computed with it are not comparable to any published FID.
    """
    from torchvision.models import inception_v3  # same module names and shapes; fc with 1008 classes

    generator = torch.Generator().manual_seed(seed)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / fan_in))
        elif key == "fc.weight":
            value.copy_(torch.randn(value.shape, generator=generator))
        elif key == "fc.bias":
            value.zero_()
    path = Path(path)
    atomic_file(path, lambda tmp: torch.save(state, tmp))
    return path

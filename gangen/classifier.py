"""A small domain classifier whose penultimate features give a domain-specific Frechet distance (FD).

Inception features (FID) need weights that cannot be downloaded everywhere, and they describe ImageNet
photos, not 28x28 garments. A classifier trained on the dataset's own labels is the offline alternative:
`gangen train-classifier` trains and saves one; metrics computed on its features are logged under
`metric/fd_<name>`, never as FID.

The saved file holds plain values only (config, state_dict, accuracy): it loads with weights_only=True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from gangen.errors import ConfigError, DataNotFoundError
from gangen.sampling import full_float32

FORMAT = "gangen-domain-classifier-v1"


class DomainClassifier(nn.Module):
    """images (B, C, R, R) in [-1, 1] -> logits (B, num_classes); `features` gives the (B, width*4) layer."""

    def __init__(self, channels: int = 1, resolution: int = 32, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            channels=channels, resolution=resolution, num_classes=num_classes, width=width
        )

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(channels, width), *block(width, width), nn.MaxPool2d(2),  # (B, w, R/2, R/2)
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, R/4, R/4)
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(4 * width, num_classes))
        self.num_features = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, num_classes)


class ClassifierTask(L.LightningModule):
    """Cross-entropy training of a DomainClassifier; logs train loss and validation accuracy."""

    def __init__(self, classifier: DomainClassifier, lr: float = 2e-3) -> None:
        super().__init__()
        self.classifier, self.lr = classifier, lr
        self.correct, self.seen = 0, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.classifier(images), labels)
        self.log("classifier/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.correct, self.seen = 0, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.correct += int((self.classifier(images).argmax(1) == labels).sum())
        self.seen += len(labels)

    def on_validation_epoch_end(self) -> None:
        self.log("classifier/val_accuracy", self.correct / max(self.seen, 1), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr)


def train_classifier(
    datamodule: L.LightningDataModule, epochs: int = 3, lr: float = 2e-3, width: int = 32, seed: int = 0, **trainer: Any
) -> tuple[DomainClassifier, float]:
    """Train on the datamodule's labels; returns the classifier (eval mode) and its held-out accuracy."""
    check_classifier_options(epochs, lr, width, seed)
    hp = datamodule.hparams
    datamodule.setup("fit")
    num_classes = datamodule.num_classes
    if not num_classes or num_classes < 2:
        raise ConfigError(
            f"dataset {hp['dataset']!r} has no class labels here: a domain classifier needs a labelled dataset "
            "(image_folder: one subfolder per class)"
        )
    L.seed_everything(seed, verbose=False)
    classifier = DomainClassifier(hp["channels"], hp["resolution"], num_classes, width)
    task = ClassifierTask(classifier, lr)
    options = dict(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_model_summary=False)
    L.Trainer(**{**options, **trainer}).fit(task, datamodule)
    return classifier.eval(), task.correct / max(task.seen, 1)


def check_classifier_options(epochs: int, lr: float, width: int, seed: int) -> None:
    """ConfigError for values train_classifier would fail on mid-training, with a traceback."""
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs} must be >= 1")
    if width < 1:
        raise ConfigError(f"--width {width} must be >= 1 (channels of the first conv block; default 32)")
    if not 0 < lr < float("inf"):
        raise ConfigError(f"--lr {lr:g} must be > 0 (Adam learning rate; default 2e-3)")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed {seed} is out of range: use 0 to 2**32 - 1")


def save_classifier(classifier: DomainClassifier, path: str | Path, **meta: Any) -> Path:
    """Write {format, config, state_dict, meta} atomically: into a uniquely named temporary file in the same
    folder (removed on failure), then renamed into place, so concurrent writers never share a temporary file."""
    from gangen.sampling import atomic_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"--output {str(path)!r}: folder {path.parent} does not exist; create it first")
    payload = {"format": FORMAT, "config": classifier.config, "state_dict": classifier.state_dict(), "meta": meta}
    atomic_file(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[DomainClassifier, dict[str, Any]]:
    """(classifier in eval mode, meta) from a file written by save_classifier; weights_only=True."""
    path = Path(path)
    if path.is_dir():  # a run or output folder: name the file meant
        found = next(iter(sorted(path.glob("*.pt"))), None)
        example = f"e.g. {found}" if found else "a .pt written by `gangen train-classifier --output FILE.pt`"
        raise ConfigError(f"feature extractor {str(path)!r} is a folder: pass the classifier file ({example})")
    if not path.is_file():
        raise DataNotFoundError(
            f"feature extractor {str(path)!r} not found: train one with `gangen train-classifier --output {path}`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or unsafe file
        raise ConfigError(f"{str(path)!r} could not be loaded safely ({type(err).__name__}): retrain it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a gangen domain classifier: make one with `gangen train-classifier`")
    classifier = DomainClassifier(**payload["config"])
    classifier.load_state_dict(payload["state_dict"])
    return classifier.to(device).eval(), dict(payload.get("meta", {}))


def metric_name(path: str | Path) -> str:
    """The name of a classifier file's distances: fd_<file stem> (metric/fd_<stem>, ...)."""
    return "fd_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)


class ClassifierExtractor:
    """A saved DomainClassifier as a metrics feature extractor: "pool" = its penultimate features.

    Its name is fd_<file stem> (e.g. metric/fd_fashion_mnist), so its distances are never reported as FID.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from gangen.inception import file_sha256

        self.weights, self.device = Path(path), torch.device(device)
        self.classifier, self.meta = load_classifier(self.weights, self.device)
        self.weights_sha256 = file_sha256(self.weights)
        self.name = metric_name(self.weights)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, C, H, W) at the classifier's resolution -> {"pool": (N, 4w)} float32."""
        cfg = self.classifier.config
        if tuple(images.shape[1:]) != (cfg["channels"], cfg["resolution"], cfg["resolution"]):
            raise ConfigError(
                f"{self.weights} was trained on ({cfg['channels']}, {cfg['resolution']}, {cfg['resolution']}) "
                f"images, got {tuple(images.shape[1:])}: train a classifier at this resolution and channels"
            )
        x = images.to(self.device).float().div_(127.5).sub_(1.0)  # the datamodule's [-1, 1] scaling
        with torch.autocast(self.device.type, enabled=False), full_float32():  # as Inception's (no TF32)
            return {"pool": self.classifier.features(x).float()}

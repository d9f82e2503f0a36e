"""Training batches built where the model runs, from one uint8 tensor: no DataLoader, no workers, no PIL.

`DeviceBatches` holds an in-memory dataset (N, C, R, R) uint8 on the training device (a GPU: moved there
once, 60k Fashion-MNIST images at 64x64 are 0.25 GB) and builds each batch there: index gather, float
conversion to [-1, 1], optional horizontal flip. Lightning accepts it as a train "dataloader" (a sized
iterable): it calls `sampler.set_epoch(epoch)` at every epoch start and does not replace it with a
DistributedSampler.

Order: the permutation of an epoch and its flips depend only on (seed, epoch) (`epoch_order`, drawn on the
CPU), the same as the DataLoader's sampler (reliability.ResumableRandomSampler) draws: the same batches on any
device and on either data path, so a resume may take the other path (`on_device: auto` decides from the free
GPU memory at every start). Under DDP every rank takes its own contiguous slice of that permutation, where
the sampler's slice starts: shards are disjoint and every rank gets the same number of full batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

ON_DEVICE_FRACTION = 0.25  # on_device "auto": the uint8 set may take at most this share of free GPU memory


ORDER_VERSION = 2  # in the data state of checkpoints: 2, both paths draw epoch_order; before, on-device drew
# its own (_legacy_plan), and a resumed run of such a checkpoint keeps drawing it


def epoch_order(seed: int, epoch: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of range(num_items), flips (num_items,) bool with p = 1/2, by position in the permutation)
    of `epoch`: depends on (seed, epoch) only, the same on every rank, device, data path and resume."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    return order, np.random.default_rng([seed, epoch, 1]).random(num_items) < 0.5


def _legacy_plan(seed: int, epoch: int, num_items: int, per_rank: int, rank: int) -> tuple[Tensor, Tensor]:
    """The on-device order before ORDER_VERSION 2 (a torch permutation, shards every per_rank items)."""
    rng = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any int seed (63 bits: a checkpoint's)
    perm = torch.randperm(num_items, generator=rng)  # (N,)
    flips = torch.rand(num_items, generator=rng) < 0.5  # (N,), indexed by position in perm
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    return perm[shard], flips[shard]


def fits_on_device(num_bytes: int, device: torch.device, fraction: float = ON_DEVICE_FRACTION) -> bool:
    """Whether `num_bytes` fit in `fraction` of the free memory of a CUDA device (False for other devices)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return num_bytes <= fraction * free


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly (the same maths as readers.collate)."""
    return images.float().div_(127.5).sub_(1.0)


class DeviceBatches:
    """Shuffled full batches (float32 images (B, C, R, R) in [-1, 1], int64 labels (B,)) built on the device."""

    def __init__(
        self,
        images: Tensor,  # (N, C, R, R) uint8; moved to `device` once
        labels: Tensor,  # (N,) int64
        batch_size: int,  # images per batch on this rank
        device: torch.device | str = "cpu",  # where batches are built (the training device)
        seed: int = 0,  # permutations and flips depend on (seed, epoch) only
        rank: int = 0,  # this process's index among `world_size`
        world_size: int = 1,  # number of training processes (DDP ranks)
        hflip: bool = False,  # flip each image left-right with probability 1/2
        legacy_order: bool = False,  # the order before ORDER_VERSION 2 (resuming an older checkpoint)
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # (N, C, R, R) uint8
        self.labels = labels.long().to(self.device)  # (N,)
        self.batch_size, self.seed, self.rank, self.world_size, self.hflip = batch_size, seed, rank, world_size, hflip
        self.legacy_order = legacy_order
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, images of this rank to skip), from a checkpoint
        self.sampler = self  # Lightning's _set_sampler_epoch looks for `sampler.set_epoch`

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """The next pass over `epoch` skips its first `position` images (trained on before the checkpoint)."""
        self._resume = (epoch, position)

    def __len__(self) -> int:
        """Full batches per epoch on each rank (the same on all ranks; leftover images are skipped)."""
        return len(self.images) // self.world_size // self.batch_size

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's image indices (len*B,) for `epoch` and whether to flip each (len*B,) bool, on the CPU."""
        num_items, per_rank = len(self.images), len(self) * self.batch_size
        if self.legacy_order:
            return _legacy_plan(self.seed, epoch, num_items, per_rank, self.rank)
        order, flips = epoch_order(self.seed, epoch, num_items)
        start = self.rank * (num_items // self.world_size)  # the sampler's shard; its tail is no full batch
        shard = slice(start, start + per_rank)
        return torch.from_numpy(order[shard]), torch.from_numpy(flips[shard])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index, flips = self.epoch_plan(self.epoch)
        index = index.to(self.device, non_blocking=True)  # one copy per epoch, then slices of it
        flips = flips.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        cpu = self.device.type == "cpu"
        first = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        for start in range(first, len(index), self.batch_size):
            batch = index[start : start + self.batch_size]  # (B,)
            if cpu:  # numpy gather + convert: single-threaded, see readers.collate (torch's pool stalls when busy)
                images = to_unit_range_numpy(self.images.numpy()[batch.numpy()])
                labels = self.labels[batch]
            else:
                images = to_unit_range(self.images.index_select(0, batch))  # (B, C, R, R) float32
                labels = self.labels.index_select(0, batch)
            if self.hflip:
                flip = flips[start : start + self.batch_size]  # (B, 1, 1, 1)
                images = torch.where(flip, images.flip(-1), images)
            yield images, labels


def to_unit_range_numpy(images: np.ndarray) -> Tensor:
    """numpy uint8 (B, C, H, W) -> float32 tensor in [-1, 1], without torch's thread pool."""
    array = images.astype(np.float32)
    array /= np.float32(127.5)
    array -= np.float32(1.0)
    return torch.from_numpy(array)

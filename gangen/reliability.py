"""Fault tolerance: atomic and safe checkpoint files, exactly resumable data order, preemption, divergence.

- AtomicCheckpointIO: checkpoints go to a temporary file in the target folder, are fsynced and renamed into
  place, so a kill mid-write never leaves a truncated .ckpt under the final name; loading always uses
  torch.load(weights_only=True), so a checkpoint cannot run pickled code, and errors are one line.
- ResumableRandomSampler: the training order depends only on (seed, epoch), and a resumed run starts part-way
  through an epoch where the checkpoint was taken, so `fit --ckpt_path last` sees the same batches as a run
  that never stopped; under DDP each rank shards the permutation itself and skips its own consumed items.
- keep_epoch_unfinished: a last.ckpt written when max_steps cut an epoch short resumes inside that epoch.
- Preemption: SIGTERM (cluster preemption) and SIGINT (Ctrl-C) stop training at the next batch boundary and
  write checkpoints/last.ckpt before the process exits with status 128 + signal.
- Divergence: GAN.check_finite raises gangen.errors.DivergenceError when a loss turned non-finite.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DistributedSampler

from gangen.batches import ORDER_VERSION, epoch_order
from gangen.cache_dir import creation_mode
from gangen.errors import ConfigError, DataNotFoundError


# ---- checkpoint files -------------------------------------------------------------------------------------
def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True) with one-line errors for missing, corrupt or code-carrying files."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"checkpoint {str(path)!r} not found: pass a .ckpt written by `gangen fit` "
            "(e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types, with long texts, for truncated or foreign files
        with open(path, "rb") as f:
            head = f.read(4)
        torch_file = head.startswith(b"PK") or head[:1] == b"\x80"  # a zip archive, or a legacy pickle
        if isinstance(err, pickle.UnpicklingError) and torch_file:  # weights_only refused a class, a function...
            found = re.search(r"GLOBAL (\S+)", str(err)) or re.search(r"Unsupported global: (\S+)", str(err))
            what = found.group(1).rstrip(",.") if found else "non-tensor objects"
            raise ConfigError(
                f"checkpoint {str(path)!r} holds pickled code or objects ({what}) that safe loading refuses; "
                "nothing in it was run: use a checkpoint written by `gangen fit`, and only load files from sources "
                "you trust"
            ) from None
        if head.startswith(b"PK"):
            what = "a damaged or truncated torch file: its zip archive does not read back"
        elif torch_file:
            what = "a damaged legacy torch file"
        else:
            what = "not a torch file"
        raise ConfigError(
            f"checkpoint {str(path)!r} could not be loaded ({what}; {type(err).__name__}): pass an intact file "
            "written by gangen (fit, or train-classifier for a feature extractor)"
        ) from None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose writes are atomic (tmp + fsync + rename) and whose loads are weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, creation_mode(0o666))  # readable as any file the user writes, not mkstemp's 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here, whatever Lightning passes: a checkpoint never runs code
        return safe_load(path, map_location=map_location or "cpu")


def find_last_checkpoint(folders: list[Path], hpc_folder: Path | None = None) -> Path | None:
    """The newest checkpoint to resume: last*.ckpt in `folders` and their checkpoints/ and version_*/checkpoints
    subfolders, and Lightning's SLURM hpc_ckpt_*.ckpt in `hpc_folder` (the trainer's default_root_dir, where
    Lightning writes them on the requeue signal), whichever was written last (modification time; on a tie a
    last*.ckpt, which ModelCheckpoint writes after the batch end where the hpc one was saved).

    By time, not by training progress (images_seen): `last` spans every version_* of a run name, and a run
    resumed from an earlier checkpoint (a rollback after a divergence, a new run of the same config) has less
    progress than the run it replaced while being the one to continue. Within one run the two orders agree:
    every save has more progress than the ones before it."""
    found: list[Path] = []
    for folder in folders:
        found += folder.glob("last*.ckpt")
        found += folder.glob("checkpoints/last*.ckpt")
        found += folder.glob("version_*/checkpoints/last*.ckpt")
    if hpc_folder is not None:
        found += sorted(hpc_folder.glob("hpc_ckpt_*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)  # max keeps the first of equals


def carry_best_checkpoints(checkpoint: dict[str, Any], trainer: L.Trainer) -> None:
    """Continue each ModelCheckpoint's best score and top k across a resume into another folder.

    A plain `fit --ckpt_path last` writes into a new version_N folder, and Lightning restores best_model_score,
    best_k_models and kth_value only when the dirpath is unchanged: the first evaluation after the resume became
    "best" whatever its value. Called before Lightning restores the callbacks (GAN.on_load_checkpoint), this
    rewrites each saved state whose dirpath differs as if it had been written in the new folder: the top-k files
    are hard-linked there (copied where linking fails) and the paths point to the links, so the new folder holds
    the run's best and top-k pruning removes links, never a file of the old folder. last_model_path is not
    carried (the new folder writes its own last.ckpt). The state depends only on the checkpoint and the
    dirpath (broadcast in setup), so every DDP rank restores the same one; rank 0 alone touches files.
    A top-k file that is gone keeps its score (the run reached it: a worse evaluation must not become the best)
    and that is said in one line.
    """
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            continue
        state = states.get(callback.state_key, states.get(callback._legacy_state_key))
        if not state or state.get("dirpath") in (None, callback.dirpath):
            continue  # resumed into the same folder: Lightning restores everything
        folder = Path(callback.dirpath)
        moved = {old: str(folder / Path(old).name) for old in state.get("best_k_models") or {}}
        if trainer.is_global_zero and moved:
            folder.mkdir(parents=True, exist_ok=True)
            for old, new in moved.items():
                if not _link_or_copy(Path(old), Path(new)):
                    score = float(state["best_k_models"][old])
                    print(f"gangen: warning: {old} is gone; its {callback.monitor} {score:g} stays in the top "
                          f"{callback.save_top_k} of {folder} (a worse evaluation does not replace it)",
                          file=sys.stderr, flush=True)  # fmt: skip
        state["best_k_models"] = {moved[old]: score for old, score in (state.get("best_k_models") or {}).items()}
        for key in ("best_model_path", "kth_best_model_path"):
            state[key] = moved.get(state.get(key), state.get(key))
        state.pop("last_model_path", None)
        state["dirpath"] = callback.dirpath
        if trainer.is_global_zero and state.get("best_model_score") is not None:
            best = float(state["best_model_score"])
            print(f"gangen: ModelCheckpoint(monitor={callback.monitor}) continues from the run's best {best:g}; "
                  f"its top {len(moved)} linked into {folder}", flush=True)  # fmt: skip


def save_last_after_top_k(trainer: L.Trainer) -> None:
    """Run the ModelCheckpoints that write last.ckpt after the other ModelCheckpoints (otherwise in their order).

    Each ModelCheckpoint saves in turn at the same validation (or epoch end): one listed before a best-by-metric
    one (as in the shipped configs) wrote last.ckpt with that one's state from before this evaluation, so a
    resume from it forgot the newest best (Lightning keeps the order given). Lightning's PR 10995 notes it.
    """
    trainer.callbacks[:] = sorted(
        trainer.callbacks, key=lambda cb: isinstance(cb, ModelCheckpoint) and bool(cb.save_last)
    )


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link source to target, or copy it (atomically) where linking fails; False when source is gone.
    An existing target is kept (a resume that ran before, or the same file)."""
    if target.exists():
        return True
    if not source.is_file():
        return False
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, creation_mode(0o666))  # as any file the user writes, not mkstemp's 0600
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return True


# ---- exactly resumable data order -------------------------------------------------------------------------
class ResumableRandomSampler(DistributedSampler):
    """A random permutation that depends only on (seed, epoch); it can start part-way through an epoch.

    Lightning calls set_epoch at every epoch start. `resume_at(epoch, position)` makes the next pass over
    that epoch skip its first `position` items (those a checkpointed run already trained on, on this rank).
    Under DDP every rank takes its own contiguous slice of the permutation (all slices equally long, the
    leftover items skipped), so each rank can skip exactly its own consumed items. It is a DistributedSampler
    only so that Lightning does not wrap it in another one; its own sharding is the one used.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1, hflip: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")  # an invariant, not user input
        self.num_items = num_items  # dataset length
        self.seed = seed  # with the epoch, fixes the order (and the flips)
        self.hflip = hflip  # yield (index, flip) keys for readers.FlipItems: flips resume with the order
        self.epoch = 0
        self.rank, self.num_replicas = rank, world_size  # DistributedSampler's names
        self.num_samples = num_items // world_size  # items per rank and epoch
        self.total_size, self.shuffle, self.drop_last = self.num_samples * world_size, True, True
        self._resume: tuple[int, int] | None = None  # (epoch, items of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        self._resume = (epoch, position)

    def order(self, epoch: int) -> np.ndarray:
        """The whole permutation of `epoch` (all ranks): on-device batches draw the same (batches.epoch_order)."""
        return epoch_order(self.seed, epoch, self.num_items)[0]

    def flips(self, epoch: int) -> np.ndarray:
        """(num_items,) bool: whether the item at each position of `epoch`'s order is flipped (p = 1/2)."""
        return epoch_order(self.seed, epoch, self.num_items)[1]

    def __iter__(self) -> Iterator[int | tuple[int, bool]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        shard = slice(self.rank * self.num_samples + start, (self.rank + 1) * self.num_samples)
        order, flips = epoch_order(self.seed, self.epoch, self.num_items)
        if self.hflip:
            yield from zip(order[shard].tolist(), flips[shard].tolist(), strict=True)
        else:
            yield from order[shard].tolist()

    def __len__(self) -> int:
        return self.num_samples


def _fit_running(trainer: L.Trainer) -> bool:
    """Whether `fit` is under way (training or its validation) or was interrupted (a SIGTERM save), not
    finished: the loops' batch counts are then those of the current epoch."""
    return trainer.state.fn == "fit" and trainer.state.status in ("running", "interrupted")


def sampler_state(trainer: L.Trainer | None, sampler: ResumableRandomSampler, batch_size: int) -> dict[str, int]:
    """What a checkpoint needs to restart `sampler` where training is now: seed, epoch, items trained on."""
    order = 1 if getattr(sampler, "legacy_order", False) else ORDER_VERSION  # how the order was drawn
    state = {"seed": sampler.seed, "epoch": sampler.epoch, "position": 0, "order": order}
    if trainer is not None:
        state["world_size"] = trainer.world_size  # the position is per rank, in shards of this many
    if trainer is not None and _fit_running(trainer):  # also in fit's validation (val_check_interval)
        # processed: batches whose training step ran this epoch (counted before on_train_batch_end, where
        # ModelCheckpoint(every_n_train_steps) saves, and equal to completed at a SIGTERM stop)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epochs = trainer.fit_loop.epoch_progress.current
        epoch = trainer.current_epoch
        if epochs.started == epochs.completed and _epoch_cut_short(trainer):
            epoch -= 1  # the cut epoch, as keep_epoch_unfinished marks it: a resume finishes it
        elif epochs.started == epochs.completed:  # between epochs (a stop signal in the last batch or at epoch
            done = 0  # end): current_epoch is the next one, the batch counts are still the finished one's
        elif done >= trainer.num_training_batches:  # at the epoch's end (ModelCheckpoint in on_train_epoch_end, a
            epoch, done = epoch + 1, 0  # validation after its last batch): Lightning resumes at the next epoch, so
            # this is the next epoch's start, which any number of processes can resume (it was the whole shard)
        state.update(epoch=epoch, position=done * batch_size)
    return state


def check_same_world(state: dict[str, int], world_size: int, source: str = "the checkpoint") -> None:
    """ConfigError if `state` (sampler_state's) stopped mid-epoch with another number of processes: each rank
    skips its own shard's first `position` items, and other shards would train some images twice, others not."""
    saved, position = state.get("world_size"), state.get("position")
    if position and saved is not None and saved != world_size:
        raise ConfigError(
            f"{source} was taken {position} images into epoch {state.get('epoch')} on each of {saved} processes, "
            f"this run has {world_size}: resume it with {saved} (--trainer.devices x --trainer.num_nodes), or from "
            "a checkpoint taken at an epoch end"
        )


def keep_epoch_unfinished(checkpoint: dict[str, Any], trainer: L.Trainer) -> None:
    """Mark a checkpoint written when an epoch was cut short (max_steps, a callback's stop) as mid-epoch.

    Lightning counts such an epoch as processed before on_train_epoch_end, where ModelCheckpoint writes
    last.ckpt, so `fit --ckpt_path last` would start the next epoch and skip the rest of this one. With the
    epoch counted as unprocessed (the state a mid-epoch step checkpoint has) the resumed run finishes it
    first, with the batches an uninterrupted run would have trained on (the sampler's position).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if loop is None or not _fit_running(trainer):
        return
    epochs = loop["epoch_progress"]
    if not _epoch_cut_short(trainer):
        return
    if all(epochs[k]["processed"] == epochs[k]["completed"] + 1 for k in ("total", "current")):
        for k in ("total", "current"):
            epochs[k]["processed"] -= 1
    elif all(epochs[k]["started"] == epochs[k]["completed"] for k in ("total", "current")):
        for k in ("total", "current"):  # written at the end of training (Preemption.on_train_end: the last save
            epochs[k]["processed"] -= 1  # was a validation's), after the epoch loop counted the cut epoch done
            epochs[k]["completed"] -= 1


def _epoch_cut_short(trainer: L.Trainer) -> bool:
    """Whether max_steps (or a callback's stop) ended the current epoch before its last batch; the batch counts
    stay that epoch's until the next one starts (also at the end of training, when the epoch is counted done)."""
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return not batches.is_last_batch and 0 < batches.current.ready < trainer.num_training_batches


# ---- preemption -------------------------------------------------------------------------------------------
_received: dict[str, int] = {}  # {"signum": N} once a stop signal arrived in this process


def received_signal() -> int | None:
    """The stop signal (SIGTERM / SIGINT) this process received during fit, if any."""
    return _received.get("signum")


class Preemption(Checkpoint):
    """On SIGTERM or SIGINT during fit: finish the current batch, write checkpoints/last.ckpt, exit 128 + signal.
    SLURM's requeue signal (auto_requeue) runs Lightning's checkpoint-and-requeue at a batch end the same way.

    The signal handlers (from the sanity check on; Lightning's teardown puts the earlier ones back) only note
    the signal. At the end of every training batch the ranks agree on it (one all-reduce under DDP), and all
    stop at the start of the next batch, where this callback writes the checkpoint: whatever runs in between
    (a validation, with its metrics; an epoch end) finishes first. Lightning's own handler broadcasts inside
    the handler: with the signal on some ranks only (one node of several preempted, or ranks signalled at
    different moments) that broadcast met the others' gradient all-reduce and the job hung without a
    checkpoint, and a signal during validation cut it short and lost its values. A signal after the last
    batch lets the run finish. A second SIGINT interrupts at once (no checkpoint).
    """

    def __init__(self) -> None:
        self._requeued = False  # SLURM requeue done in this fit
        self._stop = False  # the ranks agreed to stop: at the next batch start
        self._saving = False  # writing the stop's checkpoint (on_exception)
        self.saved: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _received.clear()
        self._requeued = self._stop = False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    @staticmethod
    def _install(trainer: L.Trainer) -> None:
        """Over Lightning's handlers (registered just before the sanity check): note the signal, nothing else."""
        if not _in_main_thread():
            return

        def on_term(signum: int, frame: Any) -> None:
            _received["signum"] = signum  # no collective here: the other ranks are somewhere else

        def on_int(signum: int, frame: Any) -> None:
            if "signum" in _received:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            on_term(signum, frame)

        def on_requeue(signum: int, frame: Any) -> None:
            _received["requeue"] = signum

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        requeue = _requeue_signal(trainer)
        if requeue is not None:  # SLURM's auto_requeue: Lightning saves inside its handler, a collective too
            signal.signal(requeue, on_requeue)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop, requeue = "signum" in _received, "requeue" in _received
        if trainer.world_size > 1:  # any rank's signal acts on every rank, here: one all-reduce
            flags = torch.tensor([stop, requeue], dtype=torch.int32, device=pl_module.device)
            stop, requeue = (bool(v) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist())
        if requeue:
            _received.pop("requeue", None)
            if not self._requeued:  # SLURM signals each task once, not all at the same batch: act once
                self._requeued = True  # Lightning's own requeue on every rank at this batch: its hpc
                trainer._signal_connector._slurm_sigusr_handler_fn(_requeue_signal(trainer), None)  # checkpoint
        self._stop = self._stop or stop

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stop:  # every rank at the same batch; on_exception saves
            raise SIGTERMException

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A ModelCheckpoint that saves after validation (check_val_every_n_epoch > 1) left the epochs after
        # the last validation out of last.ckpt (Lightning saves at the end only when it never saved)
        for callback in trainer.checkpoint_callbacks:
            if (
                isinstance(callback, ModelCheckpoint) and callback.save_last
                and 0 < callback._last_global_step_saved < trainer.global_step
            ):  # fmt: skip
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        path = self.checkpoint_path(trainer)
        self._saving = True
        try:
            trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes (atomically)
        finally:
            self._saving = False
        self.saved = path
        if trainer.is_global_zero:
            name = signal.Signals(received_signal() or signal.SIGTERM).name
            print(f"gangen: {name} received: saved {path} at kimg {pl_module.images_seen / 1000:g}; "
                  "resume with `fit ... --ckpt_path last`", flush=True)  # fmt: skip

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The stop's checkpoint is written at the next batch's start, after Lightning counted the finished batch
        in the loggers' step (_batches_that_stepped); Lightning adds that count again at a restart, as for any
        checkpoint not written at a batch end, so every later row was logged one step too high (and other
        batches logged). Saved as a batch-end checkpoint would have it."""
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
        if self._saving and loop and loop.get("_batches_that_stepped", 0) > 0:
            loop["_batches_that_stepped"] -= 1

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """last.ckpt in the folder of the first ModelCheckpoint that writes one (else of the first one), else
        <run folder>/checkpoints/last.ckpt: where the epochs' last.ckpt go, whatever the callbacks' order."""
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        for callback in sorted(callbacks, key=lambda cb: not cb.save_last):  # stable: the first of each kind
            if callback.dirpath:
                return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal on which Lightning's SLURMEnvironment(auto_requeue=True) checkpoints and requeues, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

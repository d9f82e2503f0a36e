"""Command line: Lightning's CLI (fit, validate) plus gangen's own subcommands (gangen/commands.py).

    gangen fit --config configs/dcgan_fashion_mnist.yaml [--data.batch_size 128 ...]
    gangen validate --config configs/dcgan_fashion_mnist.yaml --ckpt_path PATH
    gangen generate --ckpt_path PATH --num_samples 64 --output grid.png | DIR/ | samples.npz
    gangen export --ckpt_path PATH --output generator.safetensors

User errors (gangen.errors.GanGenError) are printed as one line and exit with status 2 (divergence: 3;
SIGTERM / SIGINT during fit: a checkpoint, then 128 + the signal number; Ctrl-C at any other time: 130).
Set GANGEN_DEBUG=1 to get the traceback too (before that line; the same exit status).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gangen.argerrors import summarize
from gangen.batches import ORDER_VERSION
from gangen.callbacks import GANMetrics
from gangen.commands import COMMANDS
from gangen.data import ImageDataModule
from gangen.distributed import check_trainer, global_batch, torchrun_restart_warning
from gangen.distributed import multi_process as _multi_process
from gangen.errors import ConfigError, GanGenError
from gangen.sampling import check_weights, read_checkpoint
from gangen.system import GAN

DESCRIPTION = (
    "gangen: train DCGAN-style GANs with Lightning. Subcommands: fit, validate (Lightning's CLI; "
    "see `gangen fit --help`), generate, evaluate, export, train-classifier, download-weights and cache "
    "(see `gangen generate --help` etc.)."
)


def keep_previous_config(path: Path) -> None:
    """A run resumed into its own folder (a W&B run id, a fixed logger version) writes its config.yaml (and a CSV
    logger its metrics.csv) again; the earlier one is kept as config.1.yaml, config.2.yaml, ... in the order the
    segments ran."""
    if not path.is_file():
        return
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)


def _keep_previous_csv(trainer: Trainer) -> None:
    """A CSV logger started in a folder that holds a metrics.csv (a fixed version: a resume into the run's own
    folder, a validate of it) deletes that file when it starts (before any callback's setup), with only a
    warning: it is kept as metrics.1.csv, ... instead."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and (Path(logger.log_dir) / "metrics.csv").is_file():
            keep_previous_config(Path(logger.log_dir) / "metrics.csv")
            warnings.filterwarnings("ignore", message="Experiment logs directory .* will be deleted")


def _quiet_own_checkpoint_folder(folder: Path) -> None:
    """Lightning warns "Checkpoint directory ... exists and is not empty" at every fit whose ModelCheckpoint
    folder holds files: also when it is the folder of the checkpoint this fit resumes (a W&B run continued, a
    fixed logger version), where that is the point. Into any other full folder it still warns."""
    names = {str(folder), os.path.abspath(folder), os.path.realpath(folder)}
    pattern = "|".join(re.escape(name) for name in sorted(names))
    warnings.filterwarnings("ignore", message=f"Checkpoint directory (?:{pattern}) exists and is not empty")


class SaveFitConfig(SaveConfigCallback):
    """Writes the resolved config.yaml into the run folder for `fit` only (validate's loggers still write
    their own files, e.g. a CSV logger's version_N/metrics.csv)."""

    def setup(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        if stage != "fit":
            return
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # every rank: it broadcasts
            if trainer.is_global_zero and log_dir is not None:
                keep_previous_config(Path(log_dir) / self.config_filename)
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
        if self.config.get("subcommand") == "fit":
            _check_training_length(trainer)
        _check_wandb(trainer.get("logger"))
        if trainer.get("strategy") == "auto" and _multi_process(trainer):
            trainer["strategy"] = "ddp_find_unused_parameters_true"
        _speed_defaults(trainer)

    def instantiate_classes(self) -> None:
        """A class that refused a value while jsonargparse built it (a ModelCheckpoint's every_n_epochs -3) came
        out as a traceback ending in jsonargparse's dump of every type it tried: one line instead."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            if isinstance(err, GanGenError):
                raise
            where = "trainer.callbacks" if "callbacks.callback.Callback" in str(err) else None
            line = summarize(str(err), where)
            if line is None:
                raise
            raise ConfigError(line) from err

    def _check_shapes(self) -> None:
        """The data must have the resolution and channels the networks were built for."""
        self.model.check_data_shape(self.datamodule)

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        self._args = args  # parsed again by _parse_ckpt_path, over the checkpoint's settings
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        seed = config.get("seed_everything") if hasattr(config, "get") else None
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:  # seeds numpy too
            raise ConfigError(f"--seed_everything {seed} is out of range: use 0 to 2**32 - 1, or true (random)")

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path PATH`: the checkpoint's model settings replace the defaults, and the config files and
        the command line still win (Lightning put the checkpoint's over everything: `--model.loss hinge` was
        silently dropped). _check_resume says what differs. The file is read safely first: a missing,
        corrupt, foreign or code-carrying checkpoint is one line."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc"):  # `last` is found in _check_resume
            return
        _refuse_export(ckpt_path)
        ckpt = read_checkpoint(ckpt_path)
        self._read_ckpt = (ckpt_path, ckpt)  # kept for _check_resume: read once
        hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "_instantiator"}
        parser = self.parser._subcommands_action._name_parser_map[subcommand]
        known = {action.dest for action in parser._actions}
        unknown = sorted(k for k in hparams if f"model.{k}" not in known)
        if unknown:
            raise ConfigError(
                f"checkpoint {ckpt_path} has model settings this gangen does not know ({', '.join(unknown)}): "
                "resume it with the gangen version that wrote it"
            )
        parser.set_defaults({f"model.{key}": value for key, value in hparams.items()})
        super().parse_arguments(self.parser, self._args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's Trainer plus gangen's fault tolerance: atomic, weights_only checkpoint files (unless a
        CheckpointIO plugin was configured) and a checkpoint on SIGTERM / SIGINT. Lightning's refusals of
        Trainer settings become one ConfigError line."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from gangen.reliability import AtomicCheckpointIO, Preemption

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:  # refused in Trainer.__init__
            # one line (ImportError: an accelerator whose package is missing, e.g. tpu without torch_xla)
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
        self._check_run_folders()
        self._check_monitors()
        self._check_resume()
        if self.model.init_from and not self.config_init[self.subcommand].get("ckpt_path"):
            self.model.read_init_from()  # a missing file or another network: one line before anything is written
        self.model.check_run(self.trainer)
        if isinstance(self.datamodule, ImageDataModule) or self.datamodule.num_classes is not None:
            self.model.check_classes(self.datamodule)  # ImageDataModule: its classes (or none) are known already
        if getattr(self.model, "cuda_graph", None) is True:  # None (auto) falls back to the eager step instead
            self.model.check_cuda_graph(self.trainer)
        if hasattr(self.datamodule, "check_train_size"):  # at least one batch per process, where that is known
            every_n_epochs = self.trainer.check_val_every_n_epoch  # None: the interval counts across epochs
            interval = self.trainer.val_check_interval if every_n_epochs is not None else None
            self.datamodule.check_train_size(self.trainer.world_size, interval)
        trainer = self.trainer
        if trainer.global_rank == 0:  # ranks are known once the Trainer exists, before any process is launched
            line = global_batch(self.datamodule.hparams["batch_size"], trainer.num_devices, trainer.num_nodes)
            print(line, flush=True)  # information on stdout; stderr carries errors only
            _keep_previous_csv(trainer)
            restarts = torchrun_restart_warning()
            if restarts:
                print(restarts, file=sys.stderr, flush=True)

    def before_validate(self) -> None:
        self._check_shapes()
        self._check_run_folders()
        self._check_resume()  # `last` found as fit finds it (Lightning alone validated fresh weights), networks
        if self.model.init_from and not self.config_init[self.subcommand].get("ckpt_path"):
            self.model.read_init_from()  # validated instead of fresh weights: checked before anything is written
        elif not self.config_init[self.subcommand].get("ckpt_path") and self.trainer.global_rank == 0:
            print(  # allowed (an untrained baseline), but most often a forgotten option
                "gangen: warning: validate without --ckpt_path scores untrained networks: pass --ckpt_path last "
                "(this run's newest last.ckpt) or a .ckpt file",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        if self.trainer.global_rank == 0:  # validate into the run's own folder: training's metrics.csv is kept
            _keep_previous_csv(self.trainer)

    def _check_run_folders(self) -> None:
        """One line for a run folder that cannot be created (a file in its path, no write permission) and for
        a CSV logger that would divide by zero, before anything is written: the loggers and ModelCheckpoint
        create their folders later, mid-setup, with a traceback."""
        from lightning.pytorch.loggers import CSVLogger

        trainer = self.trainer
        places = [] if trainer.loggers else [("--trainer.default_root_dir", trainer.default_root_dir)]  # else unused
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None) == "":  # "" is the current folder: an unset variable, likely
                raise ConfigError(
                    "--trainer.logger.init_args.save_dir is empty: pass a folder (e.g. runs); '.' for this one"
                )
            if getattr(logger, "save_dir", None):
                places.append(("--trainer.logger.init_args.save_dir", logger.save_dir))
            every = getattr(logger, "_flush_logs_every_n_steps", 1) if isinstance(logger, CSVLogger) else 1
            if every < 1:
                raise ConfigError(f"--trainer.logger.init_args.flush_logs_every_n_steps {every} must be >= 1")
        dirpaths = [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]  # Preemption has none
        places += [("a ModelCheckpoint dirpath", folder) for folder in dirpaths if folder]
        for option, folder in places:
            check_creatable(option, str(folder))

    def _check_monitors(self) -> None:
        """A ModelCheckpoint / EarlyStopping monitoring a metric/* key the metrics never log would stop the
        run with a traceback after its first evaluation (e.g. metric/fid with the metrics off)."""
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        metrics = next((cb for cb in self.trainer.callbacks if isinstance(cb, GANMetrics)), None)
        logged = metrics.logged_keys() if metrics is not None else []
        if logged and self.trainer.limit_val_batches == 0:  # metrics run at validations: none would ever run
            raise ConfigError(
                f"--metrics.feature_extractor {metrics.feature_extractor} evaluates at validations, and "
                "--trainer.limit_val_batches 0 turns them off: use --trainer.limit_val_batches 1 (the metrics draw "
                "their own samples), or --metrics.feature_extractor none"
            )
        for cb in self.trainer.callbacks:
            monitor = getattr(cb, "monitor", None) if isinstance(cb, (ModelCheckpoint, EarlyStopping)) else None
            what = metrics.feature_extractor if metrics is not None else "none"
            unlogged = _unlogged_placeholders(cb, logged)
            fixed = _filename_for(cb.filename, unlogged, logged[0]) if unlogged and logged else None
            if monitor and monitor.startswith("metric/") and monitor not in logged:
                instead = f"monitor {logged[0]}" if logged else "drop that callback"
                instead += f" with filename {shlex.quote(fixed)}" if fixed else ""
                wanted = monitor.removeprefix("metric/").split("_")[0]  # fid, kid, is, or fd (a classifier's)
                source = "a classifier file (gangen train-classifier)" if wanted == "fd" else "inception"
                raise ConfigError(
                    f"{type(cb).__name__} monitors {monitor!r}, which --metrics.feature_extractor {what} never "
                    f"logs: {instead} (in the config's trainer.callbacks), or use --metrics.feature_extractor "
                    f"{source} for {monitor}"
                )
            if unlogged:  # Lightning names the file with 0 for a key never logged: best-kimg000000-fid0.00.ckpt
                fix = (
                    f"pass --trainer.callbacks.filename {shlex.quote(fixed)} (it sets the last of trainer.callbacks; "
                    "for another, edit the config)"
                    if fixed
                    else f"drop {{{unlogged[0]}...}} from it"
                )
                raise ConfigError(
                    f"ModelCheckpoint filename {cb.filename!r} names {unlogged[0]!r}, which "
                    f"--metrics.feature_extractor {what} never logs (the file would say 0 for it): {fix}"
                )
            # every_kimg leaves the metrics out of some validations, where Lightning keeps the last value logged:
            # checkpoints were saved (and named) and early stopping counted with a value measured kimg before
            if monitor and monitor.startswith("metric/") and metrics.every_kimg:
                raise ConfigError(
                    f"{type(cb).__name__} monitors {monitor!r} at every validation, and --metrics.every_kimg "
                    f"{metrics.every_kimg:g} leaves the metrics out of some: it would be handed the last value "
                    "measured (and a resume stops with a traceback). Thin the validations instead: "
                    "--metrics.every_kimg 0 with --trainer.check_val_every_n_epoch N or --trainer.val_check_interval N"
                )

    def _check_resume(self) -> None:
        """`--ckpt_path last` means the newest last.ckpt of this run name (any version) or of a configured
        ModelCheckpoint folder; any checkpoint is read safely and checked against the model before a run
        folder is written. fit: a changed network is refused, a changed seed too (the checkpoint's random
        streams and data order continue), every other changed model or data setting is said."""
        from gangen.reliability import check_same_world, find_last_checkpoint

        fit = self.subcommand == "fit"
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        adopted = None  # the earlier W&B run `last` continues, when no run id was given
        if ckpt_path == "last":
            from lightning.pytorch.plugins.environments import SLURMEnvironment

            from gangen.tracking import WandbLogger

            logger = self.trainer.logger  # default_root_dir holds the checkpoints only when no logger has a folder
            # (searched anyway, a stray checkpoints/last.ckpt in the working directory could win over the run's)
            root = getattr(logger, "root_dir", None) if logger is not None else None
            folders = [Path(root or self.trainer.default_root_dir)]
            if root and getattr(logger, "_version", None) is not None and not isinstance(logger, WandbLogger):
                folders.append(Path(logger.log_dir))  # a fixed version: a string one names the folder as given
            folders[:0] = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            # hpc_ckpt_*: what Lightning saves on SLURM's requeue signal (it resumes one itself only without a
            # ckpt_path, and only under SLURM, as here: elsewhere one in the working directory is another job's);
            # a SIGTERM save or an epoch's last.ckpt after it is newer and wins
            hpc = Path(self.trainer.default_root_dir) if SLURMEnvironment.detect() else None
            where = [*map(str, folders), *([f"{hpc}/hpc_ckpt_*.ckpt"] if hpc else [])]
            runs = logger.project_dir if isinstance(logger, WandbLogger) and logger.new_id else None
            if runs is not None:  # no run id given: every start is a new run, so continue the project's newest
                folders += sorted(p for p in runs.glob("*") if p.is_dir())
                where.append(f"{runs}/*/checkpoints")
            found = find_last_checkpoint(folders, hpc)
            where = ", ".join(where)
            if found is None and not fit:
                raise ConfigError(f"--ckpt_path last: no last.ckpt under {where}: pass --ckpt_path PATH")
            said = self.trainer.global_rank == 0  # every DDP process runs this: one line, not one per rank
            if found is None:  # Lightning's meaning too: set and forget, the first run starts from scratch
                if said:
                    print(f"gangen: no last.ckpt under {where}: training from scratch", flush=True)
                config["ckpt_path"] = None
                return
            ckpt_path = config["ckpt_path"] = str(found)
            of = ""
            if runs is not None and found.parent.name == "checkpoints" and found.parent.parent.parent == runs:
                adopted = found.parent.parent.name
                of = f" (W&B run {adopted}, the newest of {runs} with a last.ckpt)"
            elif runs is not None:  # found outside the project's run folders (Lightning's hpc checkpoint): the
                self._read_ckpt = (ckpt_path, read_checkpoint(ckpt_path))  # W&B run it recorded, if still here
                recorded = (self._read_ckpt[1].get("gangen") or {}).get("wandb_run_id")
                if (
                    isinstance(recorded, str)
                    and recorded
                    and Path(recorded).name == recorded
                    and (runs / recorded).is_dir()
                ):
                    adopted, of = recorded, f" (W&B run {recorded}, which saved it)"
            if adopted:
                logger.continue_run(adopted)
            if said:
                verb = "resuming from" if fit else "validating"
                print(f"gangen: {verb} {found}{of}", flush=True)
        _refuse_export(ckpt_path)
        if fit:  # continuing in the checkpoint's own folder: a full one is expected there, not a warning
            _quiet_own_checkpoint_folder(Path(ckpt_path).parent)
        cached_path, ckpt = getattr(self, "_read_ckpt", (None, None))
        self._read_ckpt = (None, None)  # not kept alive during training
        ckpt = ckpt if cached_path == ckpt_path else read_checkpoint(ckpt_path)
        hparams = ckpt["hyper_parameters"]
        # a run found, not named (W&B, no id): maybe another experiment of the project; the refusals offer a new
        # run first, since following their "use the checkpoint's settings" continues that experiment's run
        found_run = f"--ckpt_path last found W&B run {adopted} ({ckpt_path}), which" if adopted else None
        new_run = f"pass --trainer.logger.init_args.id <new id> for a new run, or continue run {adopted} with"
        for name in ("generator", "discriminator"):
            _check_network(ckpt_path, name, hparams.get(name) or {}, getattr(self.model, name), found_run, new_run)
            state = {k[len(name) + 1 :]: v for k, v in ckpt["state_dict"].items() if k.startswith(f"{name}.")}
            check_weights(getattr(self.model, name), state, f"checkpoint {ckpt_path}", f"{name}.")  # damaged file
        data_saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
        data_now = dict(self.datamodule.hparams)
        if fit:  # the data's seed is not a hyperparameter: its training order's is in the checkpoint
            order = ckpt.get(type(self.datamodule).__name__) or {}
            # data.seed drew the order on both paths since ORDER_VERSION 2; before, the DataLoader's came from
            # --seed_everything (a plain resume of such a run was refused): older ones continue unchecked
            order_seed = order.get("seed") if order.get("order", 1) >= ORDER_VERSION else None
            check_same_world(order, self.trainer.world_size, f"checkpoint {ckpt_path}")
            was, now = data_saved.get("batch_size"), data_now.get("batch_size")
            if order.get("position") and was is not None and now is not None and was != now:
                raise ConfigError(  # Lightning restores the epoch's progress in batches, the position is in images
                    f"checkpoint {ckpt_path} was taken {order['position']} images into epoch {order.get('epoch')} "
                    f"with --data.batch_size {was}, this run has {now}: a mid-epoch resume with another batch size "
                    f"skips or repeats images; resume with --data.batch_size {was} (change it from a checkpoint "
                    "taken at an epoch end)"
                )
            seeds = (
                ("model", hparams.get("seed"), self.model.hparams.get("seed")),
                ("data", order_seed, getattr(self.datamodule, "seed", None)),  # None: not a gangen datamodule
            )
            for section, was, now in seeds:
                if was is not None and now is not None and now != was:
                    streams = f"continues the random streams and data order of {section}.seed {was!r}"
                    raise ConfigError(
                        f"{found_run} {streams}, the config has {now!r}: {new_run} --{section}.seed {was!r}"
                        if found_run
                        else f"checkpoint {ckpt_path} {streams}, the config has {now!r}: resume with --{section}.seed "
                        f"{was!r} (a new seed is a new run)"
                    )
        if not fit:
            return
        changes = [
            (f"{section}.{key}", now[key], value)
            for section, saved, now in (("model", hparams, self.model.hparams), ("data", data_saved, data_now))
            for key, value in saved.items()
            if key not in ("generator", "discriminator", "_instantiator", "init_from") and now.get(key, value) != value
        ]
        if adopted and changes:  # found, not named: maybe another experiment of the project, whose folder and
            name, now, was = changes[0]  # W&B run would be continued with these settings
            err = ConfigError(
                f"--ckpt_path last found W&B run {adopted} ({ckpt_path}), trained with {name} {was!r}, the config has "
                f"{now!r}: pass --trainer.logger.init_args.id {adopted} to continue that run with this config, or "
                "--trainer.logger.init_args.id <new id> for a new run"
            )
            err.on_every_rank = True  # type: ignore[attr-defined]
            raise err
        if self.trainer.global_rank != 0:
            return
        for name, now, was in changes:  # other changes train as configured: said, never silent
            print(f"gangen: resuming with {name} {now!r} as configured (checkpoint: {was!r})")
        sys.stdout.flush()


def _refuse_export(ckpt_path: str) -> None:
    if str(ckpt_path).endswith(".safetensors"):
        raise ConfigError(
            f"--ckpt_path {ckpt_path} is a generator export: fit and validate need a checkpoint from fit "
            "(checkpoints/last.ckpt); `gangen generate` and `gangen evaluate` take exports"
        )


def _check_network(
    ckpt_path: str, name: str, saved: dict, module: Any, source: str | None = None, fix: str | None = None
) -> None:
    """The configured network must be the checkpoint's (its weights are loaded as they are)."""
    from gangen.networks import check_same_network

    fix = f"{fix} its settings" if fix else "use the checkpoint's settings"
    check_same_network(source or f"checkpoint {ckpt_path}", name, saved, module, fix)


def check_creatable(option: str, folder: str) -> None:
    """ConfigError unless `folder` exists or can be created and written: its nearest existing ancestor must be a
    folder a file can be created in."""
    from gangen.sampling import write_problem

    if "://" in folder:  # a remote (fsspec) location: Lightning's to check
        return
    existing = Path(folder).absolute()
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as err:  # a folder on the way that cannot be searched
        raise ConfigError(f"{option} {folder}: {existing} cannot be read ({err.strerror}); choose another") from None
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder}: {existing} is a file, so the folder cannot be made; choose another")
    problem = write_problem(existing)
    if problem:
        raise ConfigError(f"{option} {folder}: {existing} is not writable ({problem}); choose another")


def _check_training_length(trainer: Any) -> None:
    """max_steps 0, max_epochs 0 or limit_train_batches 0 trained nothing, exited 0 and left a run folder with
    no checkpoint in it."""
    for option, fix in (
        ("max_steps", "use >= 1, or -1 (no limit) to train for --trainer.max_epochs"),
        ("max_epochs", "use >= 1, or -1 (no limit) to train for --trainer.max_steps"),
        ("limit_train_batches", "use >= 1 batches, or a fraction of the epoch in (0.0, 1.0]"),
    ):
        value = trainer.get(option)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ConfigError(f"--trainer.{option} {value} trains nothing: {fix}")


def _check_wandb(logger: Any) -> None:
    """W&B asked online with no API key, a project name W&B refuses or a timeout <= 0 fails here, as one line
    (inside the logger jsonargparse would wrap it)."""
    from gangen.tracking import check_settings, wandb_mode

    for spec in logger if isinstance(logger, list) else [logger]:
        if str(getattr(spec, "class_path", "") or "").endswith("WandbLogger"):
            init_args = getattr(spec, "init_args", None) or {}
            if str(spec.class_path) == "gangen.tracking.WandbLogger":  # Lightning's own takes project None
                check_settings(init_args.get("project", "gangen"), init_args.get("init_timeout", 15.0))
            wandb_mode(init_args.get("offline"))


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


class _CurrentStream(logging.StreamHandler):
    """Writes to sys.stdout / sys.stderr as they are when a record comes (redirected or captured later
    on), records below `below` only or from `level` on."""

    def __init__(self, name: str, level: int = logging.NOTSET, below: int | None = None) -> None:
        super().__init__()
        self._name, self._below = name, below
        self.setLevel(level)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ sets it: the current one is always used
        pass

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        return (self._below is None or record.levelno < self._below) and bool(super().filter(record))


def _lightning_info_to_stdout() -> None:
    """Lightning's information lines ("Seed set to 0", "GPU available: ...") on stdout, its warnings and
    errors on stderr: a refused run's stderr is then its one `gangen: error:` line. Only the handlers
    Lightning installs itself on stderr are replaced: the subpackages' own (when nothing configured logging)
    and the top package's "INFO: ..." one, which their records reach when the root logger had a handler at
    import (a program that configured logging first; pytest)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        own = [
            h for h in logger.handlers if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
        ]
        for handler in own:  # replaced once: the new handlers are not plain StreamHandlers
            logger.removeHandler(handler)
            for new in (_CurrentStream("stdout", below=logging.WARNING), _CurrentStream("stderr", logging.WARNING)):
                new.setFormatter(handler.formatter)
                logger.addHandler(new)


def _close_process_group(err: BaseException | None = None) -> None:
    """Destroy the distributed process group, if a run made one, before the interpreter shuts down. Lightning
    leaves it open; at exit a gloo worker thread could then drop the last reference to a finished
    collective's tensors while Python was finalizing, and its attempt to take the GIL aborted the process
    ("terminate called without an active exception", exit -6, after all the work was done; pytorch#190489).
    Called where every rank ends together (done, stopped by a signal, a gangen error) and after gloo lost a
    peer (destroying a gloo group is local), not after other crashes, where the shutdown could wait on a peer.

    After an error (`err`) its traceback's frames still held the DDP-wrapped model, whose reducer holds the
    group: destroy_process_group then only unregistered it and the gloo threads lived on into the shutdown
    (an occasional exit -6 instead of 3 after a divergence). The tracebacks are dropped and collected first."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if err is not None:
        import gc

        seen: set[int] = set()
        while err is not None and id(err) not in seen:  # the chain: __cause__ or __context__
            seen.add(id(err))
            err.__traceback__ = None
            err = err.__cause__ or err.__context__
        gc.collect()
    dist.destroy_process_group()


def _unlogged_placeholders(callback: object, logged: list[str]) -> list[str]:
    """The `{metric/...}` keys of a ModelCheckpoint's filename that the run never logs (found as Lightning
    finds them, which fills a missing one with 0)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    filename = getattr(callback, "filename", None) if isinstance(callback, ModelCheckpoint) else None
    keys = re.findall(r"\{(.*?)[:}]", filename or "")
    return [k for k in dict.fromkeys(keys) if k.startswith("metric/") and k not in logged]


def _filename_for(filename: str, unlogged: list[str], key: str) -> str:
    """The filename with each unlogged `{metric/...}` (and a label before it naming it: fid{metric/fid}) turned
    into the logged `key`: best-kimg{progress/kimg:06.0f}-fid{metric/fid:.2f} -> ...-fd_clf{metric/fd_clf:.2f}."""
    short = key.removeprefix("metric/")
    for old in unlogged:
        label = re.escape(old.removeprefix("metric/"))
        filename = re.sub(rf"(?:{label})?\{{{re.escape(old)}(?=[:}}])", f"{short}{{{key}", filename)
    return filename


def _lost_peer(err: RuntimeError) -> str | None:
    """One line for a collective that failed because another process of the run is gone (killed, out of
    memory, its node down): gloo's transport error, under a live process group of 2 or more. None for any other
    error. (NCCL waits on a lost peer until its timeout, then aborts the process: no exception to word.)"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    first_line = (str(err).splitlines() or [""])[0]
    found = re.search(r"gloo/transport/\S*\] (.+?)(?:\. |\.?$)", first_line)
    if found is None:
        return None
    return (
        f"process {dist.get_rank()} of {dist.get_world_size()} lost another process of the run (gloo: "
        f"{found.group(1)}): that process's output, or the system log for a kill or out of memory, says why; "
        "resume with --ckpt_path last"
    )


def _debug_traceback() -> None:
    """GANGEN_DEBUG=1: the traceback of the exception being handled, on stderr, before its one line; the exit
    status stays the one without it (2, 3, 130: a bare `raise` made every one 1)."""
    if os.environ.get("GANGEN_DEBUG"):
        import traceback

        traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _lightning_info_to_stdout()
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            run_lightning_cli(argv)  # None: Lightning reads sys.argv itself
        _close_process_group()
    except ArgumentError as err:  # jsonargparse: unknown keys, bad types; its usage dump becomes one line
        _debug_traceback()
        message = summarize(str(err)) or " ".join(str(err).split())
        command = args[0] if args and (args[0] in GANCLI.subcommands() or args[0] in COMMANDS) else ""
        message = message if len(message) <= 400 else message[:400] + " ..."
        print(f"gangen: error: {message} (see `gangen {command + ' ' if command else ''}--help`)", file=sys.stderr)
        sys.exit(2)
    except GanGenError as err:
        _debug_traceback()
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0 or not getattr(err, "on_every_rank", False):  # the same error on every
            print(f"gangen: error: {err}", file=sys.stderr)  # DDP process: rank 0 says it
        _close_process_group(err)
        sys.exit(getattr(err, "exit_code", 2))
    except SIGTERMException as err:  # SIGTERM / SIGINT during fit: Preemption saved a checkpoint
        from gangen.reliability import received_signal

        _close_process_group(err)
        sys.exit(128 + (received_signal() or 15))
    except KeyboardInterrupt:  # Ctrl-C before Lightning ran (parsing, building the model or data) or in a command
        _debug_traceback()
        print("gangen: interrupted", file=sys.stderr)
        _close_process_group()
        sys.exit(128 + signal.SIGINT)
    except SystemExit as err:  # Lightning's shutdown after a KeyboardInterrupt (Ctrl-C before training, or a
        if err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):  # second one) ends in exit(1)
            sys.exit(128 + signal.SIGINT)  # the shell's status for Ctrl-C, as after a checkpoint on SIGINT
        raise
    except RuntimeError as err:  # another DDP process gone mid-step: gloo's error under a page of torch's frames
        message = _lost_peer(err)
        if message is None:
            raise
        _debug_traceback()
        print(f"gangen: error: {message}", file=sys.stderr)
        _close_process_group(err)  # local for gloo: nothing waits on the peer
        sys.exit(1)

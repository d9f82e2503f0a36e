"""The GAN LightningModule: wires a generator, a discriminator, a loss and two optimizers together.

It holds no layers of its own and no GAN maths (see networks.py and losses.py); it owns the phase order,
the latent sampling and the images-seen counter that schedules count in.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from gangen.augment import DiffAugment, augment_seed
from gangen.callbacks import writes_logs_now
from gangen.distributed import broadcast_buffers_
from gangen.ema import ema_beta, make_ema, recalibrate_batchnorm_, update_ema_
from gangen.errors import ConfigError, GanGenError
from gangen.graphs import StepGraphs, gradient_hook_owners
from gangen.layers import check_choice, nhwc_strides
from gangen.losses import REGULARIZERS, gradient_penalty, loss_name, make_loss, r1_penalty
from gangen.networks import build_network, network_spec
from gangen.optim import default_adam, keep_configured_settings, make_capturable, use_fused
from gangen.reliability import carry_best_checkpoints, keep_epoch_unfinished, save_last_after_top_k
from gangen.sampling import read_checkpoint

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def intermittent_scalars(logs: dict[str, torch.Tensor], d_steps_per_g_step: int) -> dict[str, torch.Tensor]:
    """The step scalars that not every batch has: R1 / GP terms, and the G loss unless G trains every batch."""
    every_batch = {"loss/d", "d/real", "d/fake"} | ({"loss/g"} if d_steps_per_g_step == 1 else set())
    return {key: value for key, value in logs.items() if key not in every_batch}


class GAN(L.LightningModule):
    """Adversarial training of `generator` against `discriminator` with manual optimization.

    Each batch: one discriminator step; every `d_steps_per_g_step` batches also one generator step, which
    reuses the batch's generated images (one G forward per batch, as in the DCGAN reference loop), followed
    by an update of the EMA generator (`generator_ema`, when ema_kimg > 0). Both D inputs pass through the
    same DiffAugment policy. A class-conditional generator (num_classes > 0) gets the batch's real labels
    and the discriminator is called with labels too (projection discriminator).
    """

    def __init__(
        self,
        generator: nn.Module,  # z (B, latent_dim) -> images (B, C, H, W); needs `latent_dim` and `config`
        discriminator: nn.Module,  # images (B, C, H, W) -> logits (B,)
        loss: str = "non_saturating",  # "non_saturating" | "hinge" | "wasserstein" | "least_squares"
        reg: str = "none",  # discriminator regulariser: "none" | "r1" (on reals) | "gp" (WGAN-GP, interpolates)
        reg_weight: float = 10.0,  # R1 gamma or GP weight
        reg_every: int = 1,  # lazy regularisation: apply every N discriminator steps, scaled by N
        ema_kimg: float = 0.0,  # EMA half-life of the generator in thousands of images; 0: no EMA
        ema_rampup: float | None = None,  # cap the half-life at ema_rampup * images seen (e.g. 0.05); None: off
        augment: str = "",  # DiffAugment policy for D inputs, e.g. "color,translation,cutout"; "": none
        g_optimizer: OptimizerCallable | None = None,  # None: Adam(lr=2e-4, betas=(0.5, 0.999))
        d_optimizer: OptimizerCallable | None = None,  # None: Adam(lr=2e-4, betas=(0.5, 0.999))
        d_steps_per_g_step: int = 1,  # discriminator steps per generator step
        seed: int = 0,  # latents are drawn from seed + global_rank; the grid latents from seed
        num_grid_samples: int = 64,  # fixed latents for the sample grids (kept in the checkpoint)
        check_finite_every: int = 50,  # batches between non-finite loss checks (one host sync each)
        channels_last: bool | None = None,  # NHWC networks and batches; None: on CUDA and CPU unless compile
        compile: bool | str = False,  # torch.compile both networks in place; a string: its mode ("reduce-overhead")
        cuda_graph: bool | None = None,  # the whole training step as CUDA graphs; None: when the run allows it
        # (one CUDA GPU, bf16 or fp32, no augment / GP / compile / gradient hooks; README Speed)
        init_from: str | None = None,  # a checkpoint (or generator export) whose network weights start this
        # model's first fit (fine-tuning); optimizers, counters, random streams and data order start fresh
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = build_network(generator)
        self.discriminator = build_network(discriminator)
        if not isinstance(getattr(self.generator, "latent_dim", None), int):
            raise ConfigError(
                f"generator {type(self.generator).__name__} has no integer `latent_dim` (the size of z): set "
                "self.latent_dim in its __init__"
            )
        for name, opt in (("g_optimizer", g_optimizer), ("d_optimizer", d_optimizer)):
            if opt is not None and (isinstance(opt, torch.optim.Optimizer) or not callable(opt)):
                raise ConfigError(
                    f"{name} must be a callable params -> optimizer, e.g. functools.partial(torch.optim.Adam, "
                    f"lr=2e-4), not {type(opt).__name__} {opt!r:.60}"
                )
        loss = loss_name(loss)
        g_cfg, d_cfg = getattr(self.generator, "config", {}), getattr(self.discriminator, "config", {})
        for key in ("resolution", "channels"):
            if key in g_cfg and key in d_cfg and g_cfg[key] != d_cfg[key]:
                raise ConfigError(
                    f"generator {key}={g_cfg[key]} but discriminator {key}={d_cfg[key]}: set both to the same value"
                )
        counts = {"d_steps_per_g_step": d_steps_per_g_step, "num_grid_samples": num_grid_samples,
                  "check_finite_every": check_finite_every, "reg_every": reg_every}  # fmt: skip
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} {value!r} must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed {seed!r} must be an integer")
        if not -(2**63) <= seed < 2**63:  # seed + rank, seed + batch seed torch.Generators (-2**63 to 2**64 - 1)
            raise ConfigError(f"seed {seed} is out of range: use -2**63 to 2**63 - 1")  # negative: older runs
        for key, value in (("reg_weight", reg_weight), ("ema_kimg", ema_kimg)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} {value!r} must be a number")
        if not isinstance(augment, str):
            raise ConfigError(
                f"augment {augment!r} must be a string of comma-separated policies, e.g. 'color,translation'"
            )
        check_choice("reg", reg, REGULARIZERS)
        if reg_weight < 0:
            raise ConfigError(f"reg_weight {reg_weight!r} must be >= 0")
        if ema_kimg < 0 or (ema_rampup is not None and ema_rampup <= 0):
            raise ConfigError(f"ema_kimg {ema_kimg!r} must be >= 0 and ema_rampup {ema_rampup!r} > 0 or null")
        self.loss = make_loss(loss)
        self.augment = DiffAugment(augment, seed=seed)
        self.num_classes: int = int(getattr(self.generator, "num_classes", 0) or 0)
        d_classes = int(getattr(self.discriminator, "num_classes", 0) or 0)
        if d_classes != self.num_classes:
            raise ConfigError(
                f"generator num_classes={self.num_classes} but discriminator num_classes={d_classes}: set both to "
                "the same value (0: unconditional)"
            )
        self.generator_ema = make_ema(self.generator) if ema_kimg > 0 else None
        self._ema_stats_at: int | None = None  # batches_seen when the EMA's batchnorm statistics were re-estimated
        self.g_optimizer = g_optimizer or default_adam
        self.d_optimizer = d_optimizer or default_adam
        # Checkpoint hyperparameters are plain values only (loadable with weights_only=True): the networks
        # as {"class_path", "init_args"} specs, the optimizers not at all (the run's config.yaml has them).
        # load_from_checkpoint rebuilds the module through __init__ from these plain values.
        self.save_hyperparameters(
            {
                "generator": network_spec(self.generator),
                "discriminator": network_spec(self.discriminator),
                "loss": loss,
                "reg": reg,
                "reg_weight": reg_weight,
                "reg_every": reg_every,
                "ema_kimg": ema_kimg,
                "ema_rampup": ema_rampup,
                "augment": augment,
                "d_steps_per_g_step": d_steps_per_g_step,
                "seed": seed,
                "num_grid_samples": num_grid_samples,
                "check_finite_every": check_finite_every,
                "init_from": init_from,
            }
        )
        self.init_from = init_from
        self._weights_set = False  # weights came from init_from or a checkpoint: init_from is not (re)applied
        self._batch_checked = False  # the first batch's shape is checked against the generator's
        self.latent_dim: int = self.generator.latent_dim
        grid_rng = torch.Generator().manual_seed(seed)
        self.register_buffer("grid_z", torch.randn(num_grid_samples, self.latent_dim, generator=grid_rng))
        self.images_seen = 0  # global count (all ranks), restored from checkpoints
        self.batches_seen = 0  # training batches (= D steps) on this rank, from checkpoints (G-step, R1/GP schedules)
        self.checkpoint_global_step: int | None = None  # a loaded checkpoint's, for validate's metrics rows
        self._finite: torch.Tensor | None = None  # () bool on the device: every loss since the last check finite
        if compile not in (True, False) and compile not in COMPILE_MODES:
            modes = ", ".join(COMPILE_MODES)
            raise ConfigError(f"compile {compile!r} must be true, false or a torch.compile mode: {modes}")
        if cuda_graph is True and compile:
            raise ConfigError("cuda_graph and compile are both set: choose one (reduce-overhead compile also graphs)")
        self.channels_last, self.compile_networks = channels_last, compile  # runtime options, not hparams
        self.cuda_graph = cuda_graph  # as asked: True, False or None (auto)
        self._graphed = False  # this fit captures its steps: resolved in configure_model
        self.scalars_on_bar: bool | None = None  # losses as prog_bar scalars; None: not on CUDA (_log_step_scalars)
        self._step_graphs: StepGraphs | None = None  # set at fit start when the steps are captured
        self._ema_weight: torch.Tensor | None = None  # (): 1 - EMA beta, the graphs' input
        self._cudagraph_trees = False  # compiled with a mode that uses CUDA graphs: mark each step's start
        self._memory_format = torch.contiguous_format  # set in configure_model
        self._latent_rng: torch.Generator | None = None
        self._latent_rng_state: tuple[str, torch.Tensor] | None = None  # (device type, state) from a checkpoint
        self._global_rng_state: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (CPU, CUDA) to restore

    # ---- latents -------------------------------------------------------------------------------------
    def sample_latents(self, n: int) -> torch.Tensor:
        """(n, latent_dim) standard normal latents from this rank's own random stream."""
        if self._latent_rng is None or self._latent_rng.device != self.device:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(self.hparams.seed + self.global_rank)  # distinct z on every rank
            state = self._latent_rng_state
            if state is not None and state[0] == self.device.type:  # a CUDA state only fits a CUDA generator
                rng.set_state(state[1].clone())  # an own, offset-free copy (files before the fix hold views)
            self._latent_rng = rng
        return torch.randn(n, self.latent_dim, device=self.device, generator=self._latent_rng)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    # ---- training ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Memory format and torch.compile, once the training device is known (Lightning calls this first)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        # auto: NHWC when training (CPU: 1.16-1.32x faster at 64x64, README Speed), not in load_from_checkpoint
        # (which also calls this hook), nor with compile (channels_last + compile crashed on an H200)
        training = self._trainer is not None and self.trainer.training
        auto = training and device.type in ("cuda", "cpu") and not self.compile_networks
        use_nhwc = self.channels_last if self.channels_last is not None else auto
        if use_nhwc and self._memory_format != torch.channels_last:
            self._memory_format = torch.channels_last
            self.generator.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        if self.compile_networks and not getattr(self.generator, "_compiled_call_impl", None):
            mode = None if self.compile_networks is True else self.compile_networks
            self.generator.compile(mode=mode)  # in place: the state_dict keeps its keys (no `_orig_mod.`)
            self.discriminator.compile(mode=mode)
            self._cudagraph_trees = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        if self._trainer is not None:
            self.check_run(self.trainer)
            self.check_data_shape(self.trainer.datamodule)
            self.check_classes(self.trainer.datamodule)
        self._graphed = training and self._use_cuda_graph(self.trainer)
        self.augment.seed = augment_seed(self.hparams.seed, self.global_rank)  # every rank its own, not z's

    def _use_cuda_graph(self, trainer: L.Trainer) -> bool:
        """Whether this fit captures its steps: cuda_graph true (refused in one line where it cannot), or
        None and nothing in the run needs the eager step (said once on a GPU, either way)."""
        if self.cuda_graph is True:
            self.check_cuda_graph(trainer)
            return True
        if self.cuda_graph is False:
            return False
        blocker = self.cuda_graph_blocker(trainer)
        if trainer.strategy.root_device.type == "cuda":
            rank_zero_info(
                "gangen: training step captured as CUDA graphs (--model.cuda_graph false: eager)"
                if blocker is None else f"gangen: eager training step, not CUDA graphs: {blocker[0]}"
            )  # fmt: skip
        return blocker is None

    # ---- init_from: fine-tuning from another run's weights ---------------------------------------------
    def read_init_from(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state_dicts init_from gives this model: {"generator", "discriminator" (a checkpoint from fit; an
        export holds the generator only), "generator_ema"}, checked against the configured networks."""
        from gangen.networks import check_same_network
        from gangen.sampling import check_weights, generator_state, read_checkpoint

        path = str(self.init_from)
        ckpt = read_checkpoint(path)  # one-line errors for missing, damaged, unsafe or foreign files
        hparams, weights = ckpt["hyper_parameters"], ckpt["state_dict"]
        fix = "init_from needs the same networks (its weights load as they are): configure them like it"
        ema_only = not any(k.startswith("generator.") for k in weights)  # an export of an EMA generator
        states = {"generator": generator_state(ckpt, ema=ema_only)[0]}
        check_same_network(f"init_from {path}", "generator", hparams["generator"], self.generator, fix)
        d_state = {k[len("discriminator.") :]: v for k, v in weights.items() if k.startswith("discriminator.")}
        if d_state:
            check_same_network(f"init_from {path}", "discriminator", hparams["discriminator"], self.discriminator, fix)
            states["discriminator"] = d_state
        if self.generator_ema is not None:  # the file's EMA generator, else its generator
            states["generator_ema"] = generator_state(ckpt)[0]
        for name, state in states.items():  # a damaged file: one line here, not load_state_dict's traceback later
            check_weights(getattr(self, name), state, f"init_from {path}", f"{name}.")
        return states

    def _apply_init_from(self) -> None:
        """Load init_from's weights into the networks, in place (every rank, after DDP wrapped the module)."""
        states = self.read_init_from()
        for name, state in states.items():
            getattr(self, name).load_state_dict(state)
        fresh = "" if "discriminator" in states else "; the discriminator starts fresh (the file is an export)"
        if self._trainer is not None and self.trainer.state.fn == "fit":
            fresh += "; optimizers, counters and data order start fresh"
        rank_zero_info(f"gangen: {', '.join(states)} start from {self.init_from} (init_from){fresh}")

    def on_fit_start(self) -> None:
        if self._trainer is not None:
            save_last_after_top_k(self.trainer)  # last.ckpt holds this validation's best-by-metric states
        if self._trainer is None or self.trainer.ckpt_path is None:  # torch's saved streams are a resumed fit's,
            self._global_rng_state = None  # not a new fit's of a module from load_from_checkpoint (its own seed)
        if self.init_from and not self._weights_set:  # a resumed fit takes its weights from the checkpoint
            self._apply_init_from()
        self._weights_set = True  # later fits of this object continue from its weights
        if self._graphed:
            self._step_graphs = StepGraphs()
            self._ema_weight = torch.zeros((), device=self.device)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate" and self.init_from and not self._weights_set:
            self._apply_init_from()  # `validate` without a checkpoint validates init_from's weights
            self._weights_set = True

    def on_fit_end(self) -> None:
        if self._step_graphs is not None:  # Lightning has moved the model off the GPU: the graphs point at
            self._step_graphs.clear()  # freed memory, and their pools would stay allocated

    def check_run(self, trainer: L.Trainer) -> None:
        """One-line refusal of Trainer settings this module cannot train with (the CLI asks before anything
        is written)."""
        precision = str(trainer.precision)
        if self.generator_ema is not None and precision in ("bf16-true", "16-true"):
            raise ConfigError(
                f"--trainer.precision {precision} keeps the EMA generator in half precision, where its small updates "
                "round away (and sampling it crashed): use bf16-mixed, or --model.ema_kimg 0"
            )

        for name in ("g_optimizer", "d_optimizer"):  # the optimizer's own checks (lr < 0, betas, eps) up front
            try:
                getattr(self, name)([torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--model.{name} was refused: {first}: fix that setting") from e

    def check_data_shape(self, data: Any) -> None:
        """The data must have the resolution and channels the generator was built for (a datamodule with
        hyperparameters; a plain loader's first batch is checked in training_step)."""
        g, d = getattr(self.generator, "config", {}), getattr(data, "hparams", None) or {}
        for key in ("resolution", "channels"):
            if key in g and key in d and g[key] != d[key]:
                raise ConfigError(
                    f"data.{key}={d[key]} but model.generator {key}={g[key]}: set both to the same value "
                    f"(e.g. --data.{key} {g[key]})"
                )

    def _split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images (B, C, H, W), labels (B,) for a conditional model, else None) of a batch: a tensor, or a
        tuple/list (images, labels, ...) or (images,). The first batch's shape is checked (plain loaders)."""
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if self.num_classes and labels is None:
            raise ConfigError(
                f"the model is conditional on {self.num_classes} classes but the batches have no labels: give "
                "(images, labels) batches, or use an unconditional model (num_classes 0)"
            )
        if not self._batch_checked:
            g = getattr(self.generator, "config", {})
            if "resolution" in g and "channels" in g:
                want = (g["channels"], g["resolution"], g["resolution"])
                if real.ndim != 4 or tuple(real.shape[1:]) != want:
                    raise ConfigError(
                        f"training images {tuple(real.shape)} do not match the generator's (B, {want[0]}, "
                        f"{want[1]}, {want[2]}): give batches of that size, or build the networks for the data"
                    )
            self._batch_checked = True
        return real, labels if self.num_classes else None

    def check_classes(self, data: Any) -> None:
        """A conditional model needs the data's labels, one per class it was built for: an out-of-range label
        was an IndexError deep in the first step. Called once the datamodule is set up (its classes known)."""
        if not self.num_classes or not hasattr(data, "num_classes"):
            return
        classes = data.num_classes
        if classes != self.num_classes:
            have = f"has {classes} classes" if classes else "has no class labels"
            fix = (
                f"set --model.generator.num_classes {classes} and --model.discriminator.num_classes {classes}"
                if classes
                else "use an unconditional model (num_classes 0) or data with classes"
            )
            raise ConfigError(f"the model is conditional on {self.num_classes} classes but the data {have}: {fix}")

    def cuda_graph_blocker(self, trainer: L.Trainer) -> tuple[str, str] | None:
        """Why a captured step cannot serve this run and the fix other than eager training ("" if none), or
        None if it can."""
        precision, world, device = str(trainer.precision), trainer.world_size, trainer.strategy.root_device.type
        if device != "cuda":
            return f"cuda_graph needs a CUDA device, this run is on {device}", "use a GPU"
        if world > 1:
            return f"cuda_graph is single-GPU only, this run has {world} processes", "train on one GPU"
        if precision not in ("32-true", "32", "bf16-mixed", "bf16-true"):
            return f"cuda_graph does not support precision {precision!r} (a loss scaler)", "use bf16"
        if self.augment or self.hparams.reg == "gp":
            what = f"augment {self.hparams.augment!r}" if self.augment else "reg 'gp'"
            return f"cuda_graph does not support {what} (random numbers inside the step)", ""
        if self.compile_networks:
            return f"compile {self.compile_networks!r} is on", "choose torch.compile or cuda_graph"
        hooked = gradient_hook_owners(self, trainer.callbacks)
        if hooked:
            return f"{', '.join(hooked)} run Python code between backward and step, which a graph replay skips", ""
        return None

    def check_cuda_graph(self, trainer: L.Trainer) -> None:
        """One-line error for a run that a captured step cannot serve (the CLI asks before anything is written)."""
        blocker = self.cuda_graph_blocker(trainer)
        if blocker is not None:
            reason, fix = blocker
            raise ConfigError(f"{reason}: {fix + ' or ' if fix else ''}drop --model.cuda_graph")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = [
            use_fused(self.g_optimizer(self.generator.parameters())),
            use_fused(self.d_optimizer(self.discriminator.parameters())),
        ]
        if self._graphed:
            optimizers = [make_capturable(opt) for opt in optimizers]
        for name, opt in zip(("g_optimizer", "d_optimizer"), optimizers, strict=True):
            keep_configured_settings(opt, name, report=rank_zero_info)  # a resumed fit trains as configured
        return optimizers

    def _d(self, images: torch.Tensor, labels: torch.Tensor | None, eager: bool = False) -> torch.Tensor:
        """Discriminator logits (B,) of augmented images (labels only for a conditional model). `eager`: not
        through torch.compile (--model.compile), which cannot take the double backward of R1 / GP."""
        x = self.augment(images)
        if self._memory_format == torch.channels_last:
            x = nhwc_strides(x)  # 1-channel images: explicit NHWC strides, or cuDNN copies gradients (layers.py)
        d = self.discriminator._call_impl if eager else self.discriminator  # _call_impl: forward and hooks
        return d(x) if labels is None else d(x, labels)

    def _reg_due(self) -> bool:
        """Whether this D step adds the lazy R1 / GP term."""
        hp = self.hparams
        return hp.reg != "none" and hp.reg_weight != 0 and self.batches_seen % hp.reg_every == 0

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """The run's fp16 loss scaler (precision 16-mixed), or None (also outside a Trainer)."""
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _regularize(self, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None) -> dict:
        """The R1 / GP term of this D step, already scaled by reg_every (lazy regularisation)."""
        hp = self.hparams
        critic = lambda x: self._d(x, labels, eager=True)  # noqa: E731  # a lazy, less frequent step
        scaler = self._loss_scaler()  # 16-mixed: input gradients through the loss scale
        if hp.reg == "r1":
            terms = r1_penalty(critic, real, hp.reg_weight, scaler=scaler)
        else:
            terms = gradient_penalty(critic, real, fake, hp.reg_weight, generator=self._latent_rng, scaler=scaler)
        return {**terms, "loss": terms["loss"] * hp.reg_every}

    def _adversarial_step(
        self,
        real: torch.Tensor,  # (B, C, H, W) in the training memory format
        labels: torch.Tensor | None,  # (B,) int64 for a conditional model
        z: torch.Tensor,  # (B, latent_dim)
        ema_decay: float | torch.Tensor | None,  # EMA beta; in a CUDA graph 1 - beta as a 0-d device tensor
        *,
        train_g: bool,
        reg_due: bool,
        optimizers: tuple[Any, Any],  # (G, D): Lightning's wrappers, or the raw ones in a CUDA graph
        backward: Any,  # loss -> None
    ) -> dict[str, torch.Tensor]:
        """One D step and, if train_g, one G step and EMA update; the step's named scalar logs."""
        opt_g, opt_d = optimizers
        with torch.set_grad_enabled(train_g):
            fake = self.generator(z) if labels is None else self.generator(z, labels)  # (B, C, H, W)

        with self.toggled_optimizer(opt_d):
            d_real, d_fake = self._d(real, labels), self._d(fake.detach(), labels)  # (B,), (B,)
            d_terms = self.loss.discriminator(d_real, d_fake)
            reg = self._regularize(real, fake, labels) if reg_due else {}
            opt_d.zero_grad(set_to_none=True)
            backward(d_terms["loss"] + reg["loss"] if reg else d_terms["loss"])
            opt_d.step()
        logs = {"loss/d": d_terms["loss"], "d/real": d_real.mean(), "d/fake": d_fake.mean()}  # mean logits
        if reg:
            logs |= {f"loss/d_{self.hparams.reg}": reg["loss"], f"d/{self.hparams.reg}_grad_norm": reg["grad_norm"]}

        if train_g:
            with self.toggled_optimizer(opt_g):
                g_terms = self.loss.generator(self._d(fake, labels))
                opt_g.zero_grad(set_to_none=True)
                backward(g_terms["loss"])
                opt_g.step()
            logs["loss/g"] = g_terms["loss"]
            if self.generator_ema is not None and isinstance(ema_decay, torch.Tensor):
                update_ema_(self.generator_ema, self.generator, weight=ema_decay)
            elif self.generator_ema is not None:
                update_ema_(self.generator_ema, self.generator, ema_decay)
        return logs

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self._global_rng_state is not None:  # the first step after a resume: torch's streams as saved
            self._restore_global_rng()
        real, labels = self._split_batch(batch)  # (B, C, H, W); (B,) int64 labels for a conditional model
        real = real.contiguous(memory_format=self._memory_format)  # no copy unless channels_last
        if self._cudagraph_trees:
            torch.compiler.cudagraph_mark_step_begin()  # torch.compile(mode="reduce-overhead"): a new step
        n = real.shape[0]
        hp = self.hparams
        train_g = (self.batches_seen + 1) % hp.d_steps_per_g_step == 0
        reg_due = self._reg_due()
        beta = None
        if train_g and self.generator_ema is not None:
            batch_images = n * self.trainer.world_size * hp.d_steps_per_g_step  # images per G step
            beta = ema_beta(batch_images, hp.ema_kimg, self.images_seen + n * self.trainer.world_size, hp.ema_rampup)
        z = self.sample_latents(n)
        if self._step_graphs is None:
            logs = self._adversarial_step(
                real, labels, z, beta, train_g=train_g, reg_due=reg_due, optimizers=self.optimizers(),
                backward=self.manual_backward,
            )  # fmt: skip
        else:
            opt_g, opt_d = self.optimizers()
            step = functools.partial(
                self._adversarial_step, train_g=train_g, reg_due=reg_due,
                optimizers=(opt_g.optimizer, opt_d.optimizer), backward=torch.Tensor.backward,
            )  # fmt: skip
            weight = None if beta is None else self._ema_weight.fill_(1.0 - beta)  # a fill kernel, no copy
            logs = self._step_graphs((train_g, reg_due), step, real, labels, z, weight)
            for opt in (opt_d, opt_g) if train_g else (opt_d,):  # Lightning's step counters (global_step)
                opt._on_before_step()
                opt._on_after_step()

        self.images_seen += n * self.trainer.world_size
        self.batches_seen += 1
        # an fp16 loss scale that overflows the penalty's gradients makes it inf: the scaler skips that step
        overflow_ok = f"loss/d_{hp.reg}" if self._loss_scaler() is not None else None
        self._track_finite([value for key, value in logs.items() if key.startswith("loss/") and key != overflow_ok])
        self._log_step_scalars(logs, n)

    def _log_step_scalars(self, logs: dict[str, torch.Tensor], n: int) -> None:
        """self.log the step's scalars. They stay device tensors: Lightning reads them when it writes logs.

        On CUDA, where the host has to run ahead of the GPU: the losses are not prog_bar scalars (Lightning
        turns those into numbers at every batch end, a sync; the CLI's bar shows them instead), and the
        scalars every batch has are logged only on the batches whose scalars Lightning writes (self.log
        costs ~0.2 ms of host time). The intermittent ones (R1 / GP, a G step that is not every batch) are
        logged when they happen: Lightning writes the last value logged, as before.
        """
        cuda = self.device.type == "cuda"
        if cuda and self.batches_seen > 1 and not writes_logs_now(self.trainer):
            logs = intermittent_scalars(logs, self.hparams.d_steps_per_g_step)
            if not logs:
                return
        on_bar = self.scalars_on_bar if self.scalars_on_bar is not None else not cuda
        for key, value in logs.items():
            bar = on_bar and key.startswith("loss")
            self.log(key, value.detach(), on_step=True, on_epoch=False, batch_size=n, prog_bar=bar)
        kimg = torch.full((), self.images_seen / 1000.0, device=self.device)  # a fill kernel, no host-to-device copy
        self.log("progress/kimg", kimg, on_step=True, on_epoch=False, batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Discriminator outputs and loss on held-out real images against fresh samples."""
        real, labels = self._split_batch(batch)  # (B, C, H, W), (B,) or None
        rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 10_000 + batch_idx)
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device, generator=rng)
        fake = self.generator(z) if labels is None else self.generator(z, labels)
        d = self.discriminator
        d_real, d_fake = (d(real), d(fake)) if labels is None else (d(real, labels), d(fake, labels))
        d_terms = self.loss.discriminator(d_real, d_fake)
        self.log_dict(
            {"val/loss_d": d_terms["loss"], "val/d_real": d_real.mean(), "val/d_fake": d_fake.mean()},
            on_epoch=True, batch_size=real.shape[0], sync_dist=True,
        )  # fmt: skip

    # ---- divergence: non-finite losses, checked every check_finite_every batches ---------------------
    def _track_finite(self, losses: list[torch.Tensor]) -> None:
        """Fold the losses into a device-side flag (no host sync); look at it every check_finite_every batches."""
        ok = torch.stack([loss.detach() for loss in losses]).isfinite().all()
        self._finite = ok if self._finite is None else self._finite & ok
        if self.batches_seen % self.hparams.check_finite_every == 0:
            self.check_finite()

    def check_finite(self, params: bool = False) -> None:
        """Raise DivergenceError if a loss since the last check (or, with params, a weight) is nan or inf."""
        from gangen.errors import DivergenceError

        bad = self._finite is not None and not bool(self._finite)  # the one host sync
        if params and not bad:
            bad = not bool(torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all())
        self._finite = None
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:  # every rank checks here: a loss that went nan on one rank only stops them all (alone,
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # it left the others waiting)
        if bad:
            err = DivergenceError(
                f"training diverged: a loss became nan/inf before kimg {self.images_seen / 1000:g} (batch "
                f"{self.batches_seen}); stopped without saving, so the last checkpoint is the last good state: "
                "resume it (--ckpt_path last) with a lower learning rate or another loss (e.g. --model.loss hinge)"
            )
            err.on_every_rank = distributed  # the CLI prints it once (rank 0)
            raise err

    def eval_generator(self) -> nn.Module:
        """The generator to sample and evaluate: the EMA one (its batchnorm statistics re-estimated for the
        averaged weights, once per training batch at most) if there is one, else the live one.

        Under DDP every rank must call it: the live generator's batchnorm statistics differ per rank (each
        rank's own batches update them), so rank 0's, the ones a checkpoint saves, are broadcast first.
        """
        ema = self.generator_ema
        if ema is None:
            broadcast_buffers_(self.generator)  # a no-op in one process
            return self.generator
        if self._ema_stats_at != self.batches_seen:
            recalibrate_batchnorm_(ema, seed=self.hparams.seed)
            self._ema_stats_at = self.batches_seen
        return ema

    # ---- checkpoint state beyond parameters and buffers ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.generator_ema is not None:  # the saved EMA carries statistics of its own weights
            state_dict = checkpoint["state_dict"]
            for name, buf in self.eval_generator().named_buffers():
                if f"generator_ema.{name}" in state_dict:
                    state_dict[f"generator_ema.{name}"] = buf.detach().clone()
        # weights in the default (NCHW) layout, whatever the training memory format: loaders that assign
        # tensors as stored (load_generator) then compute exactly as a freshly built network does
        checkpoint["state_dict"] = {k: v.contiguous() for k, v in checkpoint["state_dict"].items()}
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.check_finite(params=True)  # never write a diverged state over a good checkpoint
        state: dict[str, Any] = {"images_seen": self.images_seen, "batches_seen": self.batches_seen}
        # every rank's random streams (every rank saves: a collective is safe); rank r resumes with states[r]
        if self.augment._rng is not None:
            state["augment_rng_device"] = self.augment._rng.device.type
            state["augment_rng_states"] = self._every_rank(self.augment._rng.get_state())
        if self._latent_rng is not None:
            state["latent_rng_device"] = self._latent_rng.device.type
            state["latent_rng_states"] = self._every_rank(self._latent_rng.get_state())
        # torch's global streams: what dropout (and a custom network's own noise) draws from
        state["torch_rng_states"] = self._every_rank(torch.get_rng_state())
        if self.device.type == "cuda":
            state["cuda_rng_states"] = self._every_rank(torch.cuda.get_rng_state(self.device))
        checkpoint["gangen"] = state
        if self._trainer is not None:
            from gangen.tracking import WandbLogger

            for logger in self.trainer.loggers:  # `--ckpt_path last` continues this W&B run from any of its
                if isinstance(logger, WandbLogger):  # checkpoints (Lightning's hpc one lies outside its folder)
                    state["wandb_run_id"] = logger._id
            keep_epoch_unfinished(checkpoint, self.trainer)  # a max_steps stop resumes mid-epoch

    def _fit_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """A checkpoint of this model with other EMA or grid settings loads (before Lightning loads it strictly):
        an EMA switched on starts from the checkpoint's generator, one switched off is dropped, and a grid of
        another size is drawn anew from the seed. Each change is said (rank 0)."""
        said = []
        ema_keys = [k for k in state_dict if k.startswith("generator_ema.")]
        if self.generator_ema is not None and not ema_keys:
            for key in [k for k in state_dict if k.startswith("generator.")]:
                state_dict["generator_ema." + key[len("generator.") :]] = state_dict[key].clone()
            said.append("the EMA generator starts from the checkpoint's generator (it had none)")
        elif self.generator_ema is None and ema_keys:
            for key in ema_keys:
                del state_dict[key]
            said.append("the checkpoint's EMA generator is dropped (--model.ema_kimg 0)")
        grid = state_dict.get("grid_z")
        if grid is not None and grid.shape != self.grid_z.shape:
            state_dict["grid_z"] = self.grid_z.detach().clone()
            said.append(f"the sample grid has {len(self.grid_z)} latents drawn from the seed (checkpoint: {len(grid)})")
        for line in said:
            rank_zero_info(f"gangen: {line}")

    def _restore_global_rng(self) -> None:
        cpu_state, cuda_state = self._global_rng_state
        self._global_rng_state = None
        torch.set_rng_state(cpu_state.clone())  # own copies: a row view of a gathered tensor is misread
        if cuda_state is not None and self.device.type == "cuda":  # a CPU run's file resumed on a GPU: unseeded
            torch.cuda.set_rng_state(cuda_state.clone(), self.device)

    def _every_rank(self, rng_state: torch.Tensor) -> list[torch.Tensor]:
        """A generator state (S,) uint8 (on the CPU, also for a CUDA generator) of every rank, in rank order."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [rng_state]
        # own copies: a row view of the gathered (world, S) tensor is saved with its storage offset, and
        # Generator.set_state misreads such a view ("Invalid mt19937 state" on rank 1 at resume)
        return [s.cpu().clone() for s in self.all_gather(rng_state.to(self.device))]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> GAN:  # type: ignore[override]
        """Lightning's, with gangen's one-line errors for a file that is not a gangen checkpoint: an export
        (`gangen export`, the generator only: `gangen.load_generator` reads it), a missing, damaged or foreign file
        (Lightning raised KeyError 'pytorch-lightning_version', or torch's unpickling error)."""
        local = isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path)
        if local and Path(checkpoint_path).suffix == ".safetensors":
            raise ConfigError(
                f"{str(checkpoint_path)!r} is an export (the generator only), not a training checkpoint: load it "
                f"with gangen.load_generator({str(checkpoint_path)!r})"
            )
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except (KeyError, TypeError, EOFError, OSError, RuntimeError, pickle.UnpicklingError):  # TypeError: another
            # Lightning project's hyperparameters given to GAN()
            if local:
                try:
                    read_checkpoint(checkpoint_path)  # one line naming the file: missing, damaged or foreign
                except GanGenError as clear:
                    raise clear from None
            raise

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_set = True  # the checkpoint's weights, not init_from's
        self.checkpoint_global_step = int(checkpoint.get("global_step", 0))  # for validate's metrics rows
        if self._trainer is not None and self.trainer.state.fn == "fit":  # before Lightning restores the callbacks
            carry_best_checkpoints(checkpoint, self.trainer)
        self._fit_state_dict(checkpoint.get("state_dict", {}))
        state = checkpoint.get("gangen", {})
        self.images_seen = int(state.get("images_seen", 0))
        self.batches_seen = int(state.get("batches_seen", 0))
        states = state.get("latent_rng_states") or [state.get("latent_rng_state")]  # older files: one state
        rng_state = states[self.global_rank] if self.global_rank < len(states) else None
        self._latent_rng_state = None if rng_state is None else (state.get("latent_rng_device", "cpu"), rng_state)
        augment_states = state.get("augment_rng_states") or [state.get("augment_rng_state")]  # older: rank 0's
        augment_state = augment_states[self.global_rank] if self.global_rank < len(augment_states) else None
        device = state.get("augment_rng_device", "cpu")  # older files: CPU states (a CUDA one is 16 bytes)
        if augment_state is not None and "augment_rng_device" not in state and augment_state.numel() == 16:
            device = "cuda"
        self.augment.pending_state = None if augment_state is None else (device, augment_state)
        cpu_states, cuda_states = state.get("torch_rng_states") or [], state.get("cuda_rng_states") or []
        if self.global_rank < len(cpu_states):  # restored at the next training step: loaders and validation
            cuda_state = cuda_states[self.global_rank] if self.global_rank < len(cuda_states) else None
            self._global_rng_state = (cpu_states[self.global_rank], cuda_state)  # may draw from it before then
        self.augment._rng = None  # created again on first use, from the pending state
        self._ema_stats_at = None  # loaded EMA statistics are re-estimated before use (older files copied them)
        self._latent_rng = None

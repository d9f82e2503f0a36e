"""The GAN LightningModule: wires a generator, a discriminator, a loss and two optimizers together.

It holds no layers of its own and no GAN maths (see networks.py and losses.py); it owns the phase order,
the latent sampling and the images-seen counter that schedules count in.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from gangen.errors import ConfigError
from gangen.losses import make_loss
from gangen.networks import build_network, network_spec


def default_adam(params: Any) -> torch.optim.Optimizer:
    """DCGAN's optimizer: Adam, lr 2e-4, beta1 0.5 (Radford et al. 2015)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def use_fused(optimizer: torch.optim.Optimizer, device_types: tuple[str, ...] = ("cuda",)) -> torch.optim.Optimizer:
    """The same Adam / AdamW with fused=True (one kernel per step) when all its parameters are on
    `device_types` and the user chose neither `fused` nor `foreach`; anything else is returned as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    defaults = optimizer.defaults
    if (
        type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW)
        or not params
        or not all(p.device.type in device_types for p in params)
        or defaults.get("fused") is not None
        or defaults.get("foreach") is not None
        or defaults.get("differentiable")
    ):
        return optimizer
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    return type(optimizer)(groups, **{**defaults, "fused": True})


def fused_if_cuda(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """use_fused on CUDA parameters only (on CPU the default foreach Adam was as fast; see README Speed)."""
    return use_fused(optimizer, ("cuda",))


class GAN(L.LightningModule):
    """Adversarial training of `generator` against `discriminator` with manual optimization.

    Each batch: one discriminator step; every `d_steps_per_g_step` batches also one generator step, which
    reuses the batch's generated images (one G forward per batch, as in the DCGAN reference loop).
    """

    def __init__(
        self,
        generator: nn.Module,  # z (B, latent_dim) -> images (B, C, H, W); needs `latent_dim` and `config`
        discriminator: nn.Module,  # images (B, C, H, W) -> logits (B,)
        loss: str = "non_saturating",  # "non_saturating" | "hinge"
        g_optimizer: OptimizerCallable | None = None,  # None: Adam(lr=2e-4, betas=(0.5, 0.999))
        d_optimizer: OptimizerCallable | None = None,  # None: Adam(lr=2e-4, betas=(0.5, 0.999))
        d_steps_per_g_step: int = 1,  # discriminator steps per generator step
        seed: int = 0,  # latents are drawn from seed + global_rank; the grid latents from seed
        num_grid_samples: int = 64,  # fixed latents for the sample grids (kept in the checkpoint)
        channels_last: bool | None = None,  # NHWC networks and batches; None: on CUDA and CPU unless compile
        compile: bool = False,  # torch.compile both networks in place (state_dict keys unchanged)
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = build_network(generator)
        self.discriminator = build_network(discriminator)
        g_cfg, d_cfg = getattr(self.generator, "config", {}), getattr(self.discriminator, "config", {})
        for key in ("resolution", "channels"):
            if key in g_cfg and key in d_cfg and g_cfg[key] != d_cfg[key]:
                raise ConfigError(
                    f"generator {key}={g_cfg[key]} but discriminator {key}={d_cfg[key]}: set both to the same value"
                )
        if d_steps_per_g_step < 1:
            raise ConfigError(f"d_steps_per_g_step {d_steps_per_g_step!r} must be >= 1")
        if num_grid_samples < 1:
            raise ConfigError(f"num_grid_samples {num_grid_samples!r} must be >= 1")
        self.loss = make_loss(loss)
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
                "d_steps_per_g_step": d_steps_per_g_step,
                "seed": seed,
                "num_grid_samples": num_grid_samples,
            }
        )
        self.latent_dim: int = self.generator.latent_dim
        grid_rng = torch.Generator().manual_seed(seed)
        self.register_buffer("grid_z", torch.randn(num_grid_samples, self.latent_dim, generator=grid_rng))
        self.images_seen = 0  # global count (all ranks), restored from checkpoints
        self.channels_last, self.compile_networks = channels_last, compile  # runtime options, not hparams
        self._memory_format = torch.contiguous_format  # set in configure_model
        self._latent_rng: torch.Generator | None = None
        self._latent_rng_state: torch.Tensor | None = None  # from a checkpoint, applied on first use

    # ---- latents -------------------------------------------------------------------------------------
    def sample_latents(self, n: int) -> torch.Tensor:
        """(n, latent_dim) standard normal latents from this rank's own random stream."""
        if self._latent_rng is None or self._latent_rng.device != self.device:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(self.hparams.seed + self.global_rank)  # distinct z on every rank
            if self._latent_rng_state is not None and self.device.type == "cpu":
                rng.set_state(self._latent_rng_state)
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
            self.generator.compile()  # in place: the state_dict keeps its keys (no `_orig_mod.`)
            self.discriminator.compile()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            fused_if_cuda(self.g_optimizer(self.generator.parameters())),
            fused_if_cuda(self.d_optimizer(self.discriminator.parameters())),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0] if isinstance(batch, (tuple, list)) else batch  # (B, C, H, W) in [-1, 1]
        real = real.contiguous(memory_format=self._memory_format)  # no copy unless channels_last
        opt_g, opt_d = self.optimizers()
        n = real.shape[0]
        train_g = (batch_idx + 1) % self.hparams.d_steps_per_g_step == 0
        with torch.set_grad_enabled(train_g):
            fake = self.generator(self.sample_latents(n))  # (B, C, H, W)

        with self.toggled_optimizer(opt_d):
            d_real, d_fake = self.discriminator(real), self.discriminator(fake.detach())  # (B,), (B,)
            d_terms = self.loss.discriminator(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_terms["loss"])
            opt_d.step()
        logs = {"loss/d": d_terms["loss"], "d/real": d_real.mean(), "d/fake": d_fake.mean()}  # mean logits

        if train_g:
            with self.toggled_optimizer(opt_g):
                g_terms = self.loss.generator(self.discriminator(fake))
                opt_g.zero_grad(set_to_none=True)
                self.manual_backward(g_terms["loss"])
                opt_g.step()
            logs["loss/g"] = g_terms["loss"]

        self.images_seen += n * self.trainer.world_size
        # Tensors stay on the device: Lightning reads them when it writes logs or refreshes the progress bar.
        for key, value in logs.items():
            self.log(key, value.detach(), on_step=True, on_epoch=False, batch_size=n, prog_bar=key.startswith("loss"))
        kimg = torch.full((), self.images_seen / 1000.0, device=self.device)  # a fill kernel, no host-to-device copy
        self.log("progress/kimg", kimg, on_step=True, on_epoch=False, batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Discriminator outputs and loss on held-out real images against fresh samples."""
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 10_000 + batch_idx)
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device, generator=rng)
        d_real, d_fake = self.discriminator(real), self.discriminator(self.generator(z))
        d_terms = self.loss.discriminator(d_real, d_fake)
        self.log_dict(
            {"val/loss_d": d_terms["loss"], "val/d_real": d_real.mean(), "val/d_fake": d_fake.mean()},
            on_epoch=True, batch_size=real.shape[0], sync_dist=True,
        )  # fmt: skip

    # ---- checkpoint state beyond parameters and buffers ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # weights in the default (NCHW) layout, whatever the training memory format: loaders that assign
        # tensors as stored (load_generator) then compute exactly as a freshly built network does
        checkpoint["state_dict"] = {k: v.contiguous() for k, v in checkpoint["state_dict"].items()}
        state: dict[str, Any] = {"images_seen": self.images_seen}
        if self._latent_rng is not None and self._latent_rng.device.type == "cpu":
            state["latent_rng_state"] = self._latent_rng.get_state()
        checkpoint["gangen"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gangen", {})
        self.images_seen = int(state.get("images_seen", 0))
        self._latent_rng_state = state.get("latent_rng_state")
        self._latent_rng = None

"""What the training step really does, observed from outside in real fits on Fashion-MNIST batches.

Hooks on the generator and the discriminator record every call of a training batch (inputs and outputs),
grouped by the optimizer step it precedes; the logged scalars are read from the metrics.csv Lightning wrote.
The expected values are recomputed here from the recorded logits, from a copy of D taken at the start of the
batch and from the batch itself, so a step that trains another loss, another penalty weight, other labels or
un-augmented D inputs than configured fails.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.losses import LOSSES, make_loss
from gangen.networks import build_network, network_spec

SHIFT = 2  # DiffAugment's largest translation at 16 x 16: int(16 * 0.125 + 0.5)
D_CALLS = ["D step D(real)", "D step D(fake)", "R1 D(real)", "G step D(fake)"]  # a batch's D calls with R1, in order


@dataclass
class Call:
    """One forward of G or D: its positional inputs and output, as detached copies."""

    inputs: tuple[torch.Tensor | None, ...]
    output: torch.Tensor


@dataclass
class Batch:
    real: torch.Tensor  # (B, 1, 16, 16) as training_step gets it
    labels: torch.Tensor  # (B,)
    d_start: torch.nn.Module  # a copy of D as the batch found it
    g_calls: list[Call] = field(default_factory=list)
    d_calls: dict[str, list[Call]] = field(default_factory=lambda: {"d": [], "g": []})  # by the step they precede
    grads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # what each optimizer stepped with
    pending: list[Call] = field(default_factory=list)  # D calls since the last optimizer step


class StepRecorder(L.Callback):
    """Records each training batch: the batch, G's and D's calls (by phase), D at the batch start, the gradients."""

    def __init__(self, model: GAN) -> None:
        self.batches: list[Batch] = []
        self.current: Batch | None = None
        # closures, not bound methods: they see the calls of these two modules only, never of a copy
        model.generator.register_forward_hook(lambda m, a, kw, out: self._call("g", m, a, kw, out), with_kwargs=True)
        model.discriminator.register_forward_hook(
            lambda m, a, kw, out: self._call("d", m, a, kw, out), with_kwargs=True
        )

    def _call(self, net: str, module, args, kwargs, output) -> None:
        if self.current is None:
            return
        inputs = (*args, kwargs["labels"]) if "labels" in kwargs else tuple(args)
        call = Call(tuple(None if x is None else x.detach().clone() for x in inputs), output.detach().clone())
        (self.current.g_calls if net == "g" else self.current.pending).append(call)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        d = pl_module.discriminator
        d_start = build_network(network_spec(d))  # a fresh D of the same configuration, with D's state now
        d_start.load_state_dict(d.state_dict())
        self.current = Batch(batch[0].detach().clone(), batch[1].detach().clone(), d_start.train())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = "g" if optimizer.param_groups[0]["params"][0] is next(pl_module.generator.parameters()) else "d"
        module = pl_module.generator if net == "g" else pl_module.discriminator
        self.current.grads[net] = {k: p.grad.detach().clone() for k, p in module.named_parameters()}
        self.current.d_calls[net] += self.current.pending
        self.current.pending = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert not self.current.pending, "D calls after the last optimizer step"
        self.batches.append(self.current)
        self.current = None


def small_gan(num_classes: int = 0, **kwargs) -> GAN:
    torch.manual_seed(0)
    return GAN(
        generator=DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8, num_classes=num_classes),
        discriminator=DCGANDiscriminator(resolution=16, channels=1, base_channels=8, num_classes=num_classes),
        **kwargs,
    )


def fit(model: GAN, save_dir: Path, batches: int) -> tuple[list[Batch], dict[int, dict[str, float]]]:
    """Train `batches` batches of 32 real images; (the recorded batches, metrics.csv's rows by step)."""
    recorder = StepRecorder(model)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        logger=CSVLogger(save_dir, name="run"), log_every_n_steps=1, callbacks=[recorder],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, ImageDataModule(resolution=16, channels=1, batch_size=32, limit=256))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = {int(row["step"]): {k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)}
    assert len(recorder.batches) == batches and sorted(rows) == list(range(batches))
    return recorder.batches, rows


def grads_of(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names, params = zip(*module.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True), strict=True))


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def grads_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_configured_loss_is_the_one_logged_and_trained(tmp_path, loss):
    """Per batch: the logged loss/d, d/real, d/fake and loss/g are the configured loss of the logits D really
    returned (no other loss gives them), and D stepped with that loss's gradient."""
    batches, rows = fit(small_gan(loss=loss), tmp_path, batches=2)
    objective = make_loss(loss)
    for step, batch in enumerate(batches):
        (real_call, fake_call), (g_step_call,) = batch.d_calls["d"], batch.d_calls["g"]
        assert torch.equal(real_call.inputs[0], batch.real)  # D step: D(real), D(fake); G step: D(fake)
        d_real, d_fake, d_g = real_call.output, fake_call.output, g_step_call.output
        row = rows[step]
        assert row["loss/d"] == pytest.approx(objective.discriminator(d_real, d_fake)["loss"].item(), rel=1e-6)
        assert row["d/real"] == pytest.approx(d_real.mean().item(), rel=1e-6, abs=1e-8)
        assert row["d/fake"] == pytest.approx(d_fake.mean().item(), rel=1e-6, abs=1e-8)
        assert row["loss/g"] == pytest.approx(objective.generator(d_g)["loss"].item(), rel=1e-6, abs=1e-8)
        for other in set(LOSSES) - {loss}:  # control: the logs tell the losses apart
            o = make_loss(other)
            alt = (o.discriminator(d_real, d_fake)["loss"].item(), o.generator(d_g)["loss"].item())
            assert alt != pytest.approx((row["loss/d"], row["loss/g"]), rel=1e-3), other
        # what D trained on: the gradient of the configured loss, recomputed with D as the batch found it
        d0, fake = batch.d_start, fake_call.inputs[0]
        assert_grads_close(batch.grads["d"], grads_of(objective.discriminator(d0(batch.real), d0(fake))["loss"], d0))


def penalty_of(d0: torch.nn.Module, at: torch.Tensor, reg: str, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, mean gradient norm) of R1 or WGAN-GP for critic d0 at images `at`, computed here."""
    x = at.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d0(x).sum(), x, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)  # (B,)
    if reg == "r1":
        return 0.5 * weight * norm.square().mean(), norm.mean()  # gamma / 2 * E ||grad D(x)||^2
    return weight * (norm - 1).square().mean(), norm.mean()  # weight * E (||grad D(x_hat)|| - 1)^2


@pytest.mark.parametrize("reg,loss", [("r1", "hinge"), ("gp", "wasserstein")])
def test_penalty_uses_reg_weight_and_reg_every(tmp_path, reg, loss):
    """reg_weight 3, reg_every 2: on batches 0 and 2 (not 1) D is called a third time in its step, on the real
    images (R1) or on points between each real and fake image (GP); the logged loss/d_{reg} is 2 x the penalty of
    weight 3 recomputed at those points, and D stepped with the gradient of loss + that term."""
    weight, every = 3.0, 2
    batches, rows = fit(small_gan(loss=loss, reg=reg, reg_weight=weight, reg_every=every), tmp_path, batches=3)
    objective = make_loss(loss)
    for step, batch in enumerate(batches):
        calls = batch.d_calls["d"]
        d0, real, fake = batch.d_start, batch.real, calls[1].inputs[0]
        d_loss = objective.discriminator(d0(real), d0(fake))["loss"]
        if step % every:
            assert len(calls) == 2
            assert_grads_close(batch.grads["d"], grads_of(d_loss, d0))
            continue
        assert len(calls) == 3
        at = calls[2].inputs[0]  # where the penalty was taken
        if reg == "r1":
            assert torch.equal(at, real)
        else:  # x_hat = real + u (fake - real), one u in [0, 1] per image
            u = ((at - real) * (fake - real)).flatten(1).sum(1) / (fake - real).square().flatten(1).sum(1)
            assert ((u >= 0) & (u <= 1)).all() and u.std() > 0.1
            torch.testing.assert_close(at, real + u.view(-1, 1, 1, 1) * (fake - real), rtol=0, atol=1e-5)
        penalty, norm = penalty_of(d0, at, reg, weight)
        assert rows[step][f"loss/d_{reg}"] == pytest.approx(every * penalty.item(), rel=1e-4)
        assert rows[step][f"d/{reg}_grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
        trained = grads_of(d_loss + every * penalty, d0)
        assert_grads_close(batch.grads["d"], trained)
        assert grads_differ(trained, grads_of(d_loss + penalty / weight, d0))  # control: gamma 1, no lazy scale


def test_conditional_step_gets_the_batch_labels(tmp_path):
    """A conditional GAN with R1: G's call and every D call of the batch (D step on real and fake, R1, G step)
    get exactly the labels of the real batch, which hold several classes."""
    batches, _ = fit(small_gan(num_classes=10, reg="r1", reg_every=1), tmp_path, batches=2)
    for batch in batches:
        assert len(batch.labels.unique()) > 3  # control: labels that are all one class would hide a swap
        assert len(batch.g_calls) == 1  # one G forward per batch: its fakes serve both steps
        d_calls = batch.d_calls["d"] + batch.d_calls["g"]
        assert len(d_calls) == 4
        for name, call in zip(["G", *D_CALLS], [*batch.g_calls, *d_calls], strict=True):
            assert len(call.inputs) == 2, f"{name} got no labels"
            assert torch.equal(call.inputs[1], batch.labels), f"{name} got other labels than the batch's"


def translation_of(out: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether every image of `out` (B, C, H, W) is its `src` image shifted by at most SHIFT pixels in y and x,
    zero-padded, as DiffAugment's translation makes it."""
    h, w = src.shape[-2:]
    padded = F.pad(src, (SHIFT, SHIFT, SHIFT, SHIFT))
    shifts = range(-SHIFT, SHIFT + 1)
    views = [padded[..., SHIFT + dy : SHIFT + dy + h, SHIFT + dx : SHIFT + dx + w] for dy in shifts for dx in shifts]
    return all(any(torch.equal(out[i], view[i]) for view in views) for i in range(len(src)))


@pytest.mark.parametrize("augment", ["translation", ""])
def test_diffaugment_reaches_every_d_input(tmp_path, augment):
    """With augment=translation every D input (D step real and fake, R1's reals, G step fake) is a translated
    copy of its source (the batch or G's output), not the source itself; with augment="" it is the source."""
    batches, _ = fit(small_gan(augment=augment, reg="r1", reg_every=1), tmp_path, batches=2)
    for batch in batches:
        assert len(batch.g_calls) == 1  # one G forward per batch: its fakes serve both steps
        fake = batch.g_calls[0].output
        d_calls = batch.d_calls["d"] + batch.d_calls["g"]
        assert len(d_calls) == 4
        for name, call, src in zip(D_CALLS, d_calls, [batch.real, fake, batch.real, fake], strict=True):
            x = call.inputs[0]
            if augment:
                assert not torch.equal(x, src), f"{name}: D saw its input un-augmented"
                assert translation_of(x, src), f"{name}: D's input is not a translation of its source"
            else:
                assert torch.equal(x, src), f"{name}: D's input is not its source"

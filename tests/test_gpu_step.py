"""The GPU step: CUDA-graph capture (--model.cuda_graph), torch.compile modes, no host syncs per batch.

The refusals, the optimizer rebuild, the tensor-weight EMA update, the sync-free progress bar and the
log-step gate run everywhere. The capture itself needs a GPU: those tests skip on CPU-only machines (CI has
no GPU; they passed on a lent H100, see the README's Speed section) and are not counted as CPU coverage."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
from conftest import assert_fit_refused
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from gangen.batches import DeviceBatches
from gangen.callbacks import SyncFreeProgressBar, SyncFreeRichProgressBar, writes_logs_now
from gangen.cli import _sync_free_progress_bar
from gangen.ema import make_ema, update_ema_
from gangen.errors import ConfigError
from gangen.graphs import StepGraphs, gradient_hook_owners
from gangen.networks import DCGANDiscriminator, DCGANGenerator
from gangen.optim import make_capturable
from gangen.system import GAN, intermittent_scalars

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def tiny_gan(**kwargs) -> GAN:
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, resolution=16, channels=1, base_channels=8)
    return GAN(g, DCGANDiscriminator(resolution=16, channels=1, base_channels=8), **kwargs)


def random_batches(device: str, batch_size: int = 32, n: int = 32 * 12) -> DeviceBatches:
    rng = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=rng)
    return DeviceBatches(images, torch.zeros(n, dtype=torch.long), batch_size, device=device, seed=2)


def fit(model: GAN, accelerator: str, precision: str = "32-true", steps: int = 12, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=-1, max_epochs=1,
        limit_train_batches=steps, logger=False, callbacks=list(callbacks), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=random_batches("cuda" if accelerator == "gpu" else "cpu"))
    return trainer


# ---- everywhere ------------------------------------------------------------------------------------------
def test_cuda_graph_on_cpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"cuda_graph needs a CUDA device, this run is on cpu") as info:
        fit(tiny_gan(cuda_graph=True), "cpu", steps=1)
    assert str(info.value) == "cuda_graph needs a CUDA device, this run is on cpu: use a GPU or drop --model.cuda_graph"


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (
            ["--model.cuda_graph", "true", "--trainer.accelerator", "cpu"],  # also where a GPU is present
            ["cuda_graph needs a CUDA device, this run is on cpu", "--model.cuda_graph"],
        ),
        (["--model.compile", "fast"], ["compile 'fast' must be true, false or a torch.compile mode"]),
    ],
)
def test_cli_refuses_graph_settings_before_writing(capsys, tmp_path, extra, needles):
    assert_fit_refused(capsys, tmp_path, extra, needles)  # one line, no run folder


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"compile": "fast"}, "compile 'fast' must be true, false or a torch.compile mode"),
        ({"compile": True, "cuda_graph": True}, "cuda_graph and compile are both set"),
    ],
)
def test_bad_compile_settings_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_gan(**kwargs)


def test_make_capturable_keeps_settings_and_state_free():
    net = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.0, 0.99), fused=True)
    rebuilt = make_capturable(adam)
    assert rebuilt is not adam and rebuilt.defaults["capturable"] and rebuilt.defaults["fused"]
    assert rebuilt.param_groups[0]["lr"] == 3e-3 and rebuilt.param_groups[0]["betas"] == (0.0, 0.99)
    assert rebuilt.param_groups[0]["params"] == list(net.parameters())
    assert make_capturable(rebuilt) is rebuilt  # already capturable
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    assert make_capturable(sgd) is sgd  # no counters to keep on the device


def test_ema_update_with_a_weight_tensor_equals_the_float_update():
    torch.manual_seed(0)
    live = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
    a, b = make_ema(live), make_ema(live)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p))
    beta = 0.99731
    update_ema_(a, live, beta)
    update_ema_(b, live, weight=torch.tensor(1.0 - beta))
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(next(a.parameters()), next(live.parameters()))
    with pytest.raises(ValueError, match="exactly one"):
        update_ema_(a, live)


class GradNorms(L.Callback):
    """A callback with Python code between backward and the optimizer step (a graph replay would skip it)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls += 1


def test_gradient_hook_owners_names_what_a_replay_would_skip():
    class Hooked(GAN):
        def on_after_backward(self) -> None:
            pass

    plain = tiny_gan()
    hooked = Hooked(DCGANGenerator(resolution=16, base_channels=8), DCGANDiscriminator(resolution=16, base_channels=8))
    bars = [SyncFreeProgressBar(), TQDMProgressBar(), RichProgressBar()]
    assert gradient_hook_owners(plain, bars) == []  # Lightning's and gangen's callbacks have no such hooks
    assert gradient_hook_owners(plain, [*bars, GradNorms()]) == ["GradNorms"]
    assert gradient_hook_owners(hooked, [GradNorms()]) == ["GradNorms", "Hooked"]


def test_auto_cuda_graph_on_cpu_trains_eagerly():
    model = tiny_gan()  # cuda_graph None: graphs where the run allows them
    assert model.cuda_graph is None
    assert tiny_gan(compile=True).cuda_graph is None  # auto with compile is no conflict: it trains eagerly
    trainer = fit(model, "cpu", steps=3)
    assert trainer.global_step == 6 and model._step_graphs is None and not model._graphed
    assert not any(opt.optimizer.defaults.get("capturable") for opt in model.optimizers())


def test_graphed_fit_sets_up_its_step_graphs_at_fit_start_not_at_validation():
    """A hook edit once moved this into on_validation_start: a graphed fit without validation trained
    eagerly, and every validation dropped the captured graphs."""
    model = tiny_gan()
    model._graphed = True
    model.on_fit_start()
    graphs = model._step_graphs
    assert isinstance(graphs, StepGraphs) and model._ema_weight is not None
    model._trainer = L.Trainer(accelerator="cpu", logger=False)
    model.on_validation_start()
    assert model._step_graphs is graphs


def test_step_graphs_needs_a_warmup_run():
    with pytest.raises(ValueError, match="warmup 0 must be >= 1"):
        StepGraphs(warmup=0)


# ---- on a GPU --------------------------------------------------------------------------------------------
@gpu
def test_step_graphs_replay_new_inputs_like_eager():
    weight = torch.randn(8, 8, device="cuda")
    state = torch.zeros(8, device="cuda")

    def step(x, scale):
        state.add_(x.sum(0))  # a side effect on a long-lived tensor, as an optimizer step is
        return {"out": (x @ weight).square().mean() * scale, "state": state.sum()}

    graphs = StepGraphs(warmup=2)
    want_state = torch.zeros(8, device="cuda")
    for i in range(6):
        x, scale = torch.randn(4, 8, device="cuda"), torch.full((), float(i), device="cuda")
        logs = graphs("key", step, x, scale)
        want_state += x.sum(0)
        torch.testing.assert_close(logs["out"], (x @ weight).square().mean() * scale)
        torch.testing.assert_close(logs["state"], want_state.sum())
    assert len(graphs) == graphs.captured == 1
    graphs("key", step, torch.randn(5, 8, device="cuda"), scale)  # a new shape: eager again, not a bad replay
    assert len(graphs) == 1
    graphs.clear()
    assert len(graphs) == 0 and graphs.captured == 1


@gpu
@pytest.mark.parametrize("options", [{}, {"reg": "r1", "reg_weight": 1.0, "reg_every": 4, "ema_kimg": 0.1}])
def test_graphed_fit_matches_eager_fit(options):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, graphed = tiny_gan(**options), tiny_gan(cuda_graph=True, **options)
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same start
    t_eager, t_graphed = fit(eager, "gpu", steps=12), fit(graphed, "gpu", steps=12)
    assert t_graphed.global_step == t_eager.global_step == 24  # D and G steps counted for Lightning
    assert graphed._step_graphs.captured == (2 if options else 1)  # one graph per (G due, R1 due) key
    assert len(graphed._step_graphs) == 0  # dropped at fit end, with their memory
    assert graphed.batches_seen == 12 and graphed.images_seen == eager.images_seen == 12 * 32
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    moved = [not torch.equal(a, b) for a, b in zip(tiny_gan(**options).parameters(), graphed.parameters(), strict=True)]
    assert all(moved)  # replays really trained every weight


@gpu
def test_auto_cuda_graph_captures_where_it_can_and_falls_back_where_it_cannot():
    model = tiny_gan()  # the default: graphs on one CUDA GPU
    trainer = fit(model, "gpu", precision="bf16-mixed", steps=8)
    assert model._graphed and model._step_graphs.captured == 1 and trainer.global_step == 16
    for kwargs, callbacks, reason in [
        ({"augment": "translation"}, [], "augment 'translation'"),
        ({"reg": "gp", "loss": "wasserstein"}, [], "reg 'gp'"),
        ({}, [GradNorms()], "GradNorms run Python code between backward and step"),
    ]:
        model = tiny_gan(**kwargs)
        trainer = fit(model, "gpu", steps=4, callbacks=callbacks)
        assert not model._graphed and model._step_graphs is None and trainer.global_step == 8, reason
        assert reason in model.cuda_graph_blocker(trainer)[0]  # said on the log at fit start
        if callbacks:
            assert callbacks[0].calls == 8  # the hook ran at every D and G step
        with pytest.raises(ConfigError, match=reason):  # asked for explicitly: refused
            model.cuda_graph = True
            model.check_cuda_graph(trainer)


@gpu
def test_graphed_fit_in_bf16_trains_and_keeps_finite_losses():
    model = tiny_gan(cuda_graph=True, ema_kimg=0.1)
    start = copy.deepcopy(model.generator.state_dict())
    trainer = fit(model, "gpu", precision="bf16-mixed", steps=12)
    assert trainer.global_step == 24 and model._step_graphs.captured == 1
    assert all(torch.isfinite(v).all() for v in trainer.callback_metrics.values())
    assert any(not torch.equal(v, model.generator.state_dict()[k]) for k, v in start.items())


@gpu
def test_fp16_fit_with_r1_takes_the_penalty_through_the_loss_scale(monkeypatch):
    """16-mixed on a GPU: the R1 penalty's input gradients go through the run's loss scaler, its overflows
    (the scaler's first scale) are skipped steps rather than a divergence, and D and G train."""
    import gangen.system

    given, r1 = [], gangen.system.r1_penalty
    monkeypatch.setattr(gangen.system, "r1_penalty", lambda *a, **kw: given.append(kw["scaler"]) or r1(*a, **kw))
    model = tiny_gan(reg="r1", reg_weight=1.0, reg_every=2, check_finite_every=1)
    start = copy.deepcopy(model.discriminator.state_dict())
    trainer = fit(model, "gpu", precision="16-mixed", steps=12)
    scaler = trainer.precision_plugin.scaler
    # the scale only falls (an overflow is a skipped step, not a divergence); that one comes within 12 steps
    # of this net was seen on the CPU's fp16 (65536 -> 1024), not yet on a GPU, so it is not asserted
    assert given == [scaler] * 6 and scaler.get_scale() <= 2.0**16 and model.batches_seen == 12
    assert torch.isfinite(trainer.callback_metrics["loss/d"]) and torch.isfinite(trainer.callback_metrics["loss/g"])
    assert any(not torch.equal(v, model.discriminator.state_dict()[k]) for k, v in start.items())


# ---- the progress bar that does not sync every batch -----------------------------------------------------
def conversions_in_fit(monkeypatch, bar: L.Callback | None, scalars_on_bar: bool | None, steps: int = 100):
    """(tensor -> number conversions, each a host-device sync on a GPU, in a CPU fit; the trainer). Plain SGD,
    whose step converts nothing itself; the module logs loss/d and loss/g at every batch."""
    count = [0]
    item = torch.Tensor.item

    def counting_item(self):
        count[0] += 1
        return item(self)

    sgd = lambda params: torch.optim.SGD(params, lr=0.01)  # noqa: E731
    model = tiny_gan(g_optimizer=sgd, d_optimizer=sgd, check_finite_every=10_000)
    model.scalars_on_bar = scalars_on_bar
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[bar] if bar else None, log_every_n_steps=10_000,
    )  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    trainer.fit(model, train_dataloaders=random_batches("cpu", batch_size=2, n=2 * steps))
    monkeypatch.undo()
    return count[0], trainer


@pytest.mark.parametrize("bar_type", [SyncFreeProgressBar, SyncFreeRichProgressBar])
def test_sync_free_bar_reads_the_losses_every_n_batches(monkeypatch, bar_type):
    lightning_count, _ = conversions_in_fit(monkeypatch, None, scalars_on_bar=None)  # on CPU: prog_bar scalars
    assert lightning_count >= 2 * 100  # Lightning converts loss/d and loss/g at every batch end
    bar = bar_type(metrics_every=50)
    ours, trainer = conversions_in_fit(monkeypatch, bar, scalars_on_bar=False)  # as on CUDA
    assert ours <= 2 * (100 // 50 + 2)  # every 50 batches, the first batch and the epoch end
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert {"loss/d", "loss/g"} <= shown.keys() and all(isinstance(shown[k], float) for k in ("loss/d", "loss/g"))
    assert shown["loss/d"] == pytest.approx(float(trainer.callback_metrics["loss/d"]))


def test_gan_logs_losses_to_the_bar_except_on_cuda(monkeypatch):
    _, trainer = conversions_in_fit(monkeypatch, None, scalars_on_bar=None, steps=3)
    assert {"loss/d", "loss/g"} <= trainer.progress_bar_metrics.keys()  # CPU: Lightning's bar shows them
    _, trainer = conversions_in_fit(monkeypatch, None, scalars_on_bar=False, steps=3)
    assert not trainer.progress_bar_metrics and "loss/d" in trainer.callback_metrics


@pytest.mark.parametrize("lightning_bar", [TQDMProgressBar(refresh_rate=7), RichProgressBar(refresh_rate=7)])
def test_cli_swaps_lightnings_bar_on_cuda_only(lightning_bar):
    trainer = L.Trainer(accelerator="cpu", logger=False, log_every_n_steps=25, callbacks=[lightning_bar])
    _sync_free_progress_bar(trainer)  # this CPU run: Lightning's bar stays
    assert trainer.progress_bar_callback is lightning_bar
    _sync_free_progress_bar(trainer, device_type="cuda")
    bar = trainer.progress_bar_callback
    assert type(bar).__mro__[2] is type(lightning_bar) and bar.metrics_every == 25 and bar.refresh_rate == 7
    assert sum(isinstance(c, ProgressBar) for c in trainer.callbacks) == 1
    custom = type("MyBar", (TQDMProgressBar,), {})()
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[custom])
    _sync_free_progress_bar(trainer, device_type="cuda")
    assert trainer.progress_bar_callback is custom  # the user's own bar is left alone


def test_writes_logs_now_agrees_with_lightning():
    seen = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:  # where training_step's answer still holds
            seen.append((writes_logs_now(trainer), trainer._logger_connector.should_update_logs))

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, limit_train_batches=7, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=5,
        callbacks=[Check()],
    )  # fmt: skip
    trainer.fit(tiny_gan(), train_dataloaders=random_batches("cpu", batch_size=2, n=14))
    assert len(seen) == 21 and [ours for ours, _ in seen] == [theirs for _, theirs in seen]
    assert sum(ours for ours, _ in seen) == 4  # batches 5, 10, 15, 20 across epochs


def test_intermittent_scalars_are_logged_when_they_happen():
    t = torch.zeros(())
    every = {"loss/d": t, "d/real": t, "d/fake": t, "loss/g": t}
    assert intermittent_scalars(every, d_steps_per_g_step=1) == {}
    assert intermittent_scalars(every, d_steps_per_g_step=2).keys() == {"loss/g"}
    r1 = {**every, "loss/d_r1": t, "d/r1_grad_norm": t}
    assert intermittent_scalars(r1, d_steps_per_g_step=1).keys() == {"loss/d_r1", "d/r1_grad_norm"}


@gpu
def test_generate_on_cuda_matches_the_cpu_without_tf32():
    """generate() turns cuDNN's default TF32 convolutions off: the same images on a GPU as on the CPU, to float32
    rounding (TF32's 10 mantissa bits would put them ~1e-3 apart and flip uint8 pixels)."""
    from gangen.sampling import generate

    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=64, resolution=32, channels=3, base_channels=64)
    cpu = generate(g, 64, seed=1)
    on_gpu = generate(copy.deepcopy(g).cuda(), 64, seed=1)
    torch.testing.assert_close(on_gpu, cpu, rtol=1e-4, atol=2e-5)
    assert torch.backends.cudnn.allow_tf32  # torch's default, restored after sampling

"""Speed paths: on-device batches (values, DDP shards, determinism, resume), fused Adam, compile, CLI defaults."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import run_cli, tiny_fit_args

from gangen.batches import DeviceBatches
from gangen.cli import _speed_defaults, native_bf16_cpu
from gangen.data import ImageDataModule
from gangen.errors import ConfigError
from gangen.layers import nhwc_strides
from gangen.networks import DCGANDiscriminator, DCGANGenerator
from gangen.optim import keep_configured_settings, make_capturable, use_fused
from gangen.readers import FlipItems, collate
from gangen.reliability import ResumableRandomSampler
from gangen.system import GAN


@pytest.fixture(scope="module")
def dm() -> ImageDataModule:
    """300 real Fashion-MNIST training images at 16x16, batch 32, built on the CPU 'device'."""
    module = ImageDataModule(resolution=16, batch_size=32, limit=300, on_device=True, seed=3)
    module.setup("fit")
    return module


def tiny_gan(compile: bool = False) -> GAN:
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
    return GAN(g, DCGANDiscriminator(resolution=16, channels=1, base_channels=8), compile=compile)


def test_device_batches_equal_in_memory_batches(dm):
    batches = dm.device_batches("cpu")
    assert len(batches) == 300 // 32
    data = dm._split("train")
    index, _ = batches.epoch_plan(0)
    seen = []
    for i, (images, labels) in enumerate(batches):
        want_images, want_labels = collate(data.__getitems__(index[i * 32 : (i + 1) * 32].tolist()))
        assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)  # same values as the loader
        assert images.min() >= -1 and images.max() <= 1
        seen.append(index[i * 32 : (i + 1) * 32])
    seen = torch.cat(seen)
    assert len(seen.unique()) == len(seen) == 9 * 32  # no image twice in an epoch


def test_ddp_shards_are_disjoint_and_equal(dm):
    data = dm._split("train")
    ranks = [DeviceBatches(data.images, data.labels, 32, seed=3, rank=r, world_size=3) for r in range(3)]
    assert [len(b) for b in ranks] == [300 // 3 // 32] * 3  # same batch count on every rank
    shards = [b.epoch_plan(5)[0] for b in ranks]
    union = torch.cat(shards)
    assert len(union.unique()) == len(union) == 3 * 3 * 32  # disjoint
    for rank, shard in enumerate(shards):  # the DataLoader sampler's shards of the one (seed, epoch) permutation
        sampler = ResumableRandomSampler(300, seed=3, rank=rank, world_size=3)
        sampler.set_epoch(5)
        assert shard.tolist() == list(sampler)[: 3 * 32]


@pytest.mark.parametrize("world_size", [1, 3])
def test_both_data_paths_give_the_same_batches(dm, world_size):
    """On-device batches and the DataLoader draw one order and one set of flips from (seed, epoch): they drew
    different ones, so a resume on the other path trained some images twice in that epoch and others never."""
    data = dm._split("train")
    for rank in range(world_size):
        device = DeviceBatches(data.images, data.labels, 32, seed=3, rank=rank, world_size=world_size, hflip=True)
        sampler = ResumableRandomSampler(len(data), seed=3, rank=rank, world_size=world_size, hflip=True)
        device.set_epoch(2)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(FlipItems(data), 32, sampler=sampler, drop_last=True, collate_fn=collate)
        pairs = list(zip(device, loader, strict=True))
        assert len(pairs) == 300 // world_size // 32
        for (images, labels), (want_images, want_labels) in pairs:
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_order_depends_only_on_seed_and_epoch(dm):
    data = dm._split("train")
    a = DeviceBatches(data.images, data.labels, 32, seed=3, hflip=True)
    b = DeviceBatches(data.images.clone(), data.labels, 32, seed=3, hflip=True)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.epoch_plan(2)[0], a.epoch_plan(3)[0])
    other = DeviceBatches(data.images, data.labels, 32, seed=4)
    assert not torch.equal(a.epoch_plan(2)[0], other.epoch_plan(2)[0])


def test_hflip_flips_about_half(dm):
    data = dm._split("train")
    batches = DeviceBatches(data.images, data.labels, 32, seed=3, hflip=True)
    index, flips = batches.epoch_plan(0)
    images = torch.cat([x for x, _ in batches])  # (288, 1, 16, 16)
    plain = collate(data.__getitems__(index.tolist()))[0]
    assert torch.equal(images[flips], plain[flips].flip(-1)) and torch.equal(images[~flips], plain[~flips])
    assert 0.3 < flips.float().mean() < 0.7


def test_dataloader_flips_come_with_the_order_and_resume_with_it(dm):
    """--data.hflip through the DataLoader (the CPU and file-dataset path): each image is mirrored where the
    sampler's (seed, epoch) flips say, for batches gathered at once and item by item, and a loader resumed
    mid-epoch gives the rest of the epoch exactly (flips drawn from torch's global generator did not)."""
    data = dm._split("train")
    sampler = ResumableRandomSampler(len(data), seed=11, hflip=True)
    sampler.set_epoch(1)
    keys = list(sampler)
    index, flips = sampler.order(1), sampler.flips(1)
    assert keys == list(zip(index.tolist(), flips.tolist(), strict=True))
    assert 0.3 < flips.mean() < 0.7
    flipped = FlipItems(data)
    batch = collate(flipped.__getitems__(keys[:64]))[0]
    plain = collate(data.__getitems__(index[:64].tolist()))[0]
    f = torch.from_numpy(flips[:64])
    assert torch.equal(batch[f], plain[f].flip(-1)) and torch.equal(batch[~f], plain[~f])
    by_item = collate([flipped[key] for key in keys[:64]])[0]  # datasets without __getitems__ (image files)
    assert torch.equal(by_item, batch)

    def loader(resume_at: int | None) -> list[torch.Tensor]:
        order = ResumableRandomSampler(len(data), seed=11, hflip=True)
        order.set_epoch(1)
        if resume_at is not None:
            order.resume_at(1, resume_at)
        return [
            x for x, _ in torch.utils.data.DataLoader(flipped, 32, sampler=order, drop_last=True, collate_fn=collate)
        ]

    torch.manual_seed(0)
    whole = loader(None)
    torch.manual_seed(1)  # another global stream, as a resumed process has
    rest = loader(3 * 32)
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(whole[3:], rest, strict=True))


def test_on_device_order_takes_a_63_bit_seed(dm):
    """A checkpoint of an unseeded DataLoader run holds a 63-bit seed; on-device batches must accept it."""
    data = dm._split("train")
    big = DeviceBatches(data.images, data.labels, 32, seed=2**63 - 1)
    assert len(big.epoch_plan(0)[0].unique()) == 9 * 32


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).append(batch[0].clone())


class SaveAndStopAt(L.Callback):
    """A mid-epoch checkpoint after `batches` training batches of the first epoch, then stop."""

    def __init__(self, batches: int, path: Path) -> None:
        self.batches, self.path = batches, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed == self.batches:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(
    dm: ImageDataModule, epochs: int, ckpt_path: str | None = None, *callbacks: L.Callback
) -> tuple[L.Trainer, RecordBatches]:
    record = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[record, *callbacks],
    )  # fmt: skip
    trainer.fit(tiny_gan(), dm, ckpt_path=ckpt_path)
    return trainer, record


def test_lightning_sets_the_epoch_and_resume_replays_it(dm, tmp_path):
    trainer, full = fit(dm, epochs=2)
    assert isinstance(trainer.train_dataloader, DeviceBatches)
    for epoch in (0, 1):
        want = torch.cat([x for x, _ in _epoch(dm, epoch)])
        assert torch.equal(torch.cat(full.batches[epoch]), want)
    first, _ = fit(dm, epochs=1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = fit(dm, epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert list(resumed.batches) == [1]
    assert torch.equal(torch.cat(resumed.batches[1]), torch.cat(full.batches[1]))  # exact resume


@pytest.mark.parametrize("first_on_device", [True, False])
def test_a_mid_epoch_resume_may_take_the_other_data_path(tmp_path, first_on_device):
    """`on_device: auto` picks the path from the free GPU memory at every start, so a resume can take the other
    one: it then trained 15 of 64 images twice and 15 never in that epoch. Now the epoch ends as the
    uninterrupted run on the resume's path would have trained it, flips included."""

    def module(on_device: bool) -> ImageDataModule:
        return ImageDataModule(resolution=16, batch_size=32, limit=300, on_device=on_device, hflip=True, seed=5)

    _, whole = fit(module(not first_on_device), epochs=1)
    ckpt = tmp_path / "mid.ckpt"
    _, part = fit(module(first_on_device), 1, None, SaveAndStopAt(3, ckpt))
    _, rest = fit(module(not first_on_device), epochs=1, ckpt_path=str(ckpt))
    assert len(part.batches[0]) == 3 and len(rest.batches[0]) == 9 - 3
    assert torch.equal(torch.cat(part.batches[0] + rest.batches[0]), torch.cat(whole.batches[0]))


def test_an_older_on_device_checkpoint_resumes_in_its_own_order(tmp_path):
    """Checkpoints without the data state's "order" drew the on-device order another way (a torch permutation):
    resumed on the device, they continue in it."""
    old = ImageDataModule(resolution=16, batch_size=32, limit=300, on_device=True, seed=5)
    old._order_version = 1  # as every checkpoint of the earlier code
    ckpt = tmp_path / "old.ckpt"
    _, part = fit(old, 1, None, SaveAndStopAt(3, ckpt))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["ImageDataModule"].pop("order") == 1
    torch.save(saved, ckpt)  # the earlier code wrote no "order"
    _, rest = fit(ImageDataModule(resolution=16, batch_size=32, limit=300, on_device=True, seed=5), 1, str(ckpt))
    data = old._split("train")
    legacy = DeviceBatches(data.images, data.labels, 32, seed=5, legacy_order=True)
    assert torch.equal(torch.cat(part.batches[0] + rest.batches[0]), torch.cat([x for x, _ in legacy]))
    current = DeviceBatches(data.images, data.labels, 32, seed=5)
    assert not torch.equal(legacy.epoch_plan(0)[0], current.epoch_plan(0)[0])


def _epoch(dm: ImageDataModule, epoch: int) -> DeviceBatches:
    batches = dm.device_batches("cpu")
    batches.set_epoch(epoch)
    return batches


def test_on_device_cli_fit(tmp_path):
    result = run_cli(*tiny_fit_args(tmp_path, "--data.on_device", "true", "--data.hflip", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    config = (tmp_path / "dcgan_fashion_mnist" / "version_0" / "config.yaml").read_text()
    assert "on_device: true" in config and "hflip: true" in config
    precision = "bf16-mixed" if native_bf16_cpu() else "null"  # the CPU bf16 default reaches the Trainer
    assert f"precision: {precision}" in config
    assert ("Using bfloat16 Automatic Mixed Precision" in result.stdout + result.stderr) == native_bf16_cpu()


def test_on_device_refuses_per_image_datasets(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="on_device true needs image_folder decoded once"):
        ImageDataModule(dataset="image_folder", root=str(tmp_path), on_device=True, cache=False)
    with pytest.raises(ConfigError, match="on_device 'yes' is invalid"):
        ImageDataModule(on_device="yes")


def test_auto_stays_off_on_cpu(dm):
    auto = ImageDataModule(resolution=16, batch_size=32, limit=300)
    assert auto.on_device == "auto" and not auto.use_on_device(torch.device("cpu"))
    assert dm.use_on_device(torch.device("cpu"))  # on_device true: CPU in-memory batches without a DataLoader


def test_fused_adam_same_hyperparameters_and_steps():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    plain = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.9), eps=1e-7)
    assert use_fused(plain) is plain  # CPU parameters: unchanged
    fused = use_fused(torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.9), eps=1e-7), ("cpu",))
    assert fused.defaults["fused"] is True and fused.param_groups[0]["betas"] == (0.5, 0.9)
    assert fused.defaults["lr"] == 1e-3 and fused.defaults["eps"] == 1e-7
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    reference = torch.optim.Adam(twin.parameters(), lr=1e-3, betas=(0.5, 0.9), eps=1e-7)
    for _ in range(3):
        for model, opt in ((net, fused), (twin, reference)):
            opt.zero_grad()
            model(torch.ones(2, 4)).square().sum().backward()
            opt.step()
    torch.testing.assert_close(net.weight, twin.weight)
    user_choice = torch.optim.Adam(net.parameters(), foreach=False)
    assert use_fused(user_choice, ("cpu",)) is user_choice  # an explicit foreach/fused is respected


def test_adamw_rebuilt_fused_or_capturable_keeps_its_class_and_decoupled_decay():
    # torch 2.14's AdamW.defaults hold Adam's decoupled_weight_decay, which AdamW() does not take: a rebuild
    # that passed every default crashed configure_optimizers of any CUDA run with AdamW
    torch.manual_seed(0)
    net, twin = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    fused = use_fused(torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1), ("cpu",))
    capturable = make_capturable(torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1))
    for opt in (fused, capturable):
        assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.1
        assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert fused.defaults["fused"] is True and capturable.defaults["capturable"] is True
    reference_net = torch.nn.Linear(4, 3)
    reference_net.load_state_dict(net.state_dict())
    reference = torch.optim.AdamW(reference_net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for model, opt in ((net, fused), (reference_net, reference)):
            opt.zero_grad()
            model(torch.ones(2, 4)).square().sum().backward()
            opt.step()
    torch.testing.assert_close(net.weight, reference_net.weight)
    plain_adam = torch.optim.Adam(reference_net.parameters(), lr=1e-2, weight_decay=0.1)  # L2, not decoupled
    assert make_capturable(plain_adam).param_groups[0]["decoupled_weight_decay"] is False


def test_resumed_optimizer_keeps_its_configured_settings_and_flags():
    """torch's load_state_dict takes every group setting from the file: the old learning rate, and the old
    run's flags. A CUDA-graph run saves capturable groups with their counters on the GPU; resumed on the CPU
    (or in DDP, without graphs) the first step crashed. The file below is such a run's, as a CPU load sees
    it: capturable=True groups over a CPU-trained state."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    trained = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for _ in range(2):
        trained.zero_grad()
        net(torch.ones(2, 4)).square().sum().backward()
        trained.step()
    saved = trained.state_dict()
    for group in saved["param_groups"]:
        group["capturable"] = True
    lines: list[str] = []

    def resumed(lr: float) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
        keep_configured_settings(opt, "g_optimizer", report=lines.append)
        opt.load_state_dict(saved)
        return opt

    opt = resumed(1e-4)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-4 and group["capturable"] is False and group["betas"] == (0.5, 0.999)
    assert lines == ["gangen: resumed g_optimizer lr 0.0001 as configured (checkpoint: 0.0002)"]  # betas: same
    step = opt.state[net.weight]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and step.item() == 2  # the count goes on
    before = net.weight.detach().clone()
    opt.zero_grad()
    net(torch.ones(2, 4)).square().sum().backward()
    opt.step()  # torch alone: "If capturable=True, params and state_steps must be on supported devices"
    assert not torch.equal(net.weight, before)
    lines.clear()
    resumed(2e-4)
    assert lines == []  # nothing changed: nothing said
    older = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}  # an older torch's file:
    for group in older["param_groups"]:  # no flags it did not have yet; still Adam's state, kept
        del group["decoupled_weight_decay"], group["maximize"]
    again = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))
    keep_configured_settings(again, "g_optimizer", report=lines.append)
    again.load_state_dict(older)
    assert again.state[net.weight]["step"].item() >= 2 and "exp_avg" in again.state[net.weight] and lines == []
    plain = torch.optim.Adam(net.parameters(), lr=1e-4)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["capturable"] is True and plain.param_groups[0]["lr"] == 2e-4  # what it fixes


@pytest.mark.parametrize(
    ("cls", "before", "after", "buffer"),
    [
        (torch.optim.Adam, {}, {"amsgrad": True}, "max_exp_avg_sq"),
        (torch.optim.AdamW, {}, {"amsgrad": True}, "max_exp_avg_sq"),
        (torch.optim.RMSprop, {}, {"momentum": 0.9}, "momentum_buffer"),
        (torch.optim.RMSprop, {}, {"centered": True}, "grad_avg"),
    ],
)
def test_a_setting_switched_on_at_resume_gets_its_buffer(cls, before, after, buffer):
    """A resume with amsgrad (or RMSprop momentum / centered) switched on crashed its first step with
    KeyError: the checkpoint's state lacks the buffer the setting needs. It starts at zero, as torch's does,
    and the other buffers carry on."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    trained = cls(net.parameters(), lr=1e-3, **before)
    for _ in range(2):
        trained.zero_grad()
        net(torch.ones(2, 4)).square().sum().backward()
        trained.step()
    saved = trained.state_dict()
    opt = cls(net.parameters(), lr=1e-3, **after)
    lines: list[str] = []
    keep_configured_settings(opt, "g_optimizer", report=lines.append)
    opt.load_state_dict(saved)
    [key] = after
    assert lines == [f"gangen: resumed g_optimizer {key} {after[key]} as configured (checkpoint: {_off(cls, key)})"]
    state = opt.state[net.weight]
    assert torch.equal(state[buffer], torch.zeros_like(net.weight))
    kept = next(k for k in saved["state"][0] if k != "step")
    assert torch.equal(state[kept], saved["state"][0][kept])
    opt.zero_grad()
    net(torch.ones(2, 4)).square().sum().backward()
    opt.step()
    assert state[buffer].abs().sum() > 0 and net.weight.isfinite().all()


def test_a_resume_with_the_same_settings_adds_no_buffers():
    """The buffers were probed on a 1-D parameter: Adafactor keeps `variance` there but row/column variances
    for a matrix, so every resume added an unused full-size `variance` to each weight matrix."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4)
    trained = torch.optim.Adafactor(net.parameters(), lr=1e-2)
    net(torch.ones(2, 8)).square().sum().backward()
    trained.step()
    saved = trained.state_dict()
    opt = torch.optim.Adafactor(net.parameters(), lr=1e-2)
    keep_configured_settings(opt, "g_optimizer")
    opt.load_state_dict(saved)
    assert {k: sorted(v) for k, v in opt.state_dict()["state"].items()} == {
        k: sorted(v) for k, v in saved["state"].items()
    }
    assert "variance" not in opt.state[net.weight] and "variance" in opt.state[net.bias]


def _off(cls, key):
    return cls([torch.zeros(1, requires_grad=True)]).defaults[key]


def test_compile_option_compiles_in_place_and_keeps_keys():
    model = tiny_gan(compile=True)
    keys = list(model.state_dict())
    model.configure_model()
    assert model.generator._compiled_call_impl is not None and model.discriminator._compiled_call_impl is not None
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefixes: checkpoints stay interchangeable


@pytest.mark.parametrize("reg", ["r1", "gp"])
def test_compiled_networks_regularise_through_the_eager_discriminator(reg):
    """torch.compile cannot take the double backward of R1 / GP ("does not currently support double
    backward"): --model.compile with reg r1 or gp crashed at the first regularised step. The penalty goes
    through the same discriminator uncompiled; its value and gradients equal an uncompiled model's."""
    torch.manual_seed(0)
    compiled = tiny_gan(compile=True)
    plain = tiny_gan()
    plain.load_state_dict(compiled.state_dict())
    compiled.configure_model()
    assert compiled.discriminator._compiled_call_impl is not None
    real, fake = torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4, 1, 16, 16) * 2 - 1
    grads = []
    for model in (compiled, plain):
        model.hparams.reg = reg
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # GP's interpolation weights
        terms = model._regularize(real, fake, None)
        terms["loss"].backward()
        grads.append((terms["loss"].detach(), [p.grad for p in model.discriminator.parameters()]))
    (loss, got), (want_loss, want) = grads
    torch.testing.assert_close(loss, want_loss)
    assert sum(g is not None for g in got) > 1  # the penalty reaches D's weights (not the last bias)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_compiled_fit_with_r1_trains_on_the_cpu_and_saves_uncompiled_keys(tmp_path):
    """`--model.compile true` really trains (inductor's C++ kernels on the CPU): 2 batches with R1 at every D
    step (compile takes no double backward: this combination crashed), finite losses, and a last.ckpt whose
    keys are an uncompiled model's (no `_orig_mod.`), so it loads strictly into a GAN without compile."""
    args = tiny_fit_args(tmp_path, "--model.compile", "true", "--model.reg", "r1", "--model.reg_every", "1",
                         "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0")  # fmt: skip
    inductor = tmp_path / "inductor"  # its own kernel cache: compiled in this test, not read from an earlier one
    r = run_cli(*args, env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(inductor.rglob("*.so")), "nothing was compiled"
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {key: [float(row[key]) for row in rows if row.get(key)] for key in ("loss/d", "loss/g", "loss/d_r1")}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values()), losses
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 2
    assert not [key for key in ckpt["state_dict"] if "_orig_mod" in key]
    loaded = GAN.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert getattr(loaded.generator, "_compiled_call_impl", None) is None  # strict load into plain networks
    assert all(torch.equal(value, ckpt["state_dict"][key]) for key, value in loaded.state_dict().items())


def test_channels_last_option(dm):
    model = GAN(
        DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8),
        DCGANDiscriminator(resolution=16, channels=1, base_channels=8),
        channels_last=True,
    )
    model.configure_model()
    conv = model.discriminator.net[2].weight  # (C_out, C_in, 4, 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_speed_defaults_on_cpu_bf16_only_where_native():
    trainer = {"accelerator": "cpu", "precision": None, "benchmark": None}
    _speed_defaults(trainer)
    expected = "bf16-mixed" if native_bf16_cpu() else None  # AVX512-BF16 / AMX: about 2x (bench/throughput.py)
    assert trainer == {"accelerator": "cpu", "precision": expected, "benchmark": None}
    explicit = {"accelerator": "cpu", "precision": "32-true", "benchmark": None}
    _speed_defaults(explicit)
    assert explicit["precision"] == "32-true"  # a user's choice is kept


def test_native_bf16_probe_matches_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split()  # Linux, like every machine this suite runs on
    assert native_bf16_cpu() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_channels_last_by_default_in_fit_not_in_loading(dm, tmp_path):
    trainer, _ = fit(dm, epochs=1)
    model = trainer.lightning_module
    assert model.discriminator.net[2].weight.is_contiguous(memory_format=torch.channels_last)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["discriminator.net.2.weight"]
    assert saved.is_contiguous()  # checkpoints keep the default layout
    loaded = GAN.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert loaded.discriminator.net[2].weight.is_contiguous()  # generation stays NCHW, bit-equal to load_generator


def test_nhwc_strides_view():
    x = torch.randn(2, 1, 5, 6, requires_grad=True)
    assert x.contiguous(memory_format=torch.channels_last).stride() == (30, 30, 6, 1)  # the ambiguity it fixes
    y = nhwc_strides(x)
    assert y.stride() == (30, 1, 6, 1) and y.data_ptr() == x.data_ptr() and torch.equal(y, x)  # a view
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # R1 differentiates through it
    torch.testing.assert_close(grad, 2 * x)
    rgb = torch.randn(2, 3, 5, 6)
    assert nhwc_strides(rgb) is rgb  # more channels: unambiguous, left alone


def test_one_channel_images_reach_d_with_nhwc_strides(dm):
    """Every input of D's first conv in a channels_last fit (reals, fakes, R1's reals) has NHWC strides: with
    NCHW ones cuDNN converts that layer's output gradients to NCHW and back (layers.nhwc_strides)."""
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
    model = GAN(g, DCGANDiscriminator(resolution=16, channels=1, base_channels=8), reg="r1", reg_every=2)
    strides = []
    model.discriminator.net[0].register_forward_pre_hook(lambda module, args: strides.append(args[0].stride()))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert model._memory_format == torch.channels_last
    assert len(strides) == 4 * 3 + 2  # per batch D(real), D(fake) for D, D(fake) for G; R1 every 2nd batch
    assert set(strides) == {(16 * 16, 1, 16, 1)}, set(strides)

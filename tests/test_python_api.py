"""gangen from Python: what GAN, the networks, generate and the metrics refuse up front, and plain loaders."""

from __future__ import annotations

import functools

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gangen import GAN, DCGANDiscriminator, DCGANGenerator, ImageDataModule
from gangen.errors import ConfigError
from gangen.losses import HingeLoss


def nets(resolution: int = 16, channels: int = 1, num_classes: int = 0):
    torch.manual_seed(0)
    shape = {"resolution": resolution, "channels": channels, "base_channels": 8, "num_classes": num_classes}
    return DCGANGenerator(latent_dim=8, **shape), DCGANDiscriminator(**shape)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{
        "accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, **kwargs,
    })  # fmt: skip


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"resolution": 32}, "data.resolution=32 but model.generator resolution=16"),
        ({"channels": 3}, "data.channels=3 but model.generator channels=1"),
    ],
)
def test_a_datamodule_of_another_shape_is_one_line(data, needle):
    """The CLI checked this; a Python fit crashed deep in a conv ('padded input size', 'expected 3 channels')."""
    with pytest.raises(ConfigError, match=needle):
        trainer().fit(GAN(*nets()), ImageDataModule(**{"resolution": 16, "channels": 1, "limit": 64} | data))


def test_plain_loaders_of_images_alone_train_and_are_checked():
    """A TensorDataset of images yields one-item batches: an IndexError in training_step. Their shape is
    checked at the first batch, and a conditional model without labels is one line."""
    images = torch.rand(64, 1, 16, 16) * 2 - 1
    model = GAN(*nets())
    trainer().fit(model, DataLoader(TensorDataset(images), batch_size=32))
    assert model.batches_seen == 1
    with pytest.raises(ConfigError, match=r"training images \(32, 1, 32, 32\) do not match the generator's"):
        trainer().fit(GAN(*nets()), DataLoader(TensorDataset(torch.rand(64, 1, 32, 32)), batch_size=32))
    with pytest.raises(ConfigError, match="conditional on 3 classes but the batches have no labels"):
        trainer().fit(GAN(*nets(num_classes=3)), DataLoader(TensorDataset(images), batch_size=32))


class Custom(nn.Module):
    def __init__(self, latent_dim: int = 8, act: str = "relu") -> None:
        super().__init__()
        self.latent_dim, self.config = latent_dim, {"latent_dim": latent_dim, "act": act}
        self.net = nn.Sequential(nn.Linear(latent_dim, 256), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, 1, 16, 16)


def test_custom_networks_are_checked_when_the_gan_is_built():
    """An object in `config` trained and saved, then failed to load (as 'pickled code'); config keys the
    constructor does not take failed at load; a generator without latent_dim was a bare AttributeError."""
    d = nets()[1]
    model = GAN(Custom(), d)  # plain config, latent_dim: fine
    assert model.hparams["generator"]["init_args"] == {"latent_dim": 8, "act": "relu"}
    bad_value = Custom()
    bad_value.config["act"] = nn.ReLU()
    with pytest.raises(ConfigError, match=r"Custom.config\['act'\] is a ReLU: a checkpoint holds plain values"):
        GAN(bad_value, d)
    bad_key = Custom()
    bad_key.config["width"] = 3
    with pytest.raises(ConfigError, match=r"Custom.config does not fit Custom.__init__ .*'width'"):
        GAN(bad_key, d)
    no_latent = Custom()
    del no_latent.latent_dim
    with pytest.raises(ConfigError, match="has no integer `latent_dim`"):
        GAN(no_latent, d)


def test_wrong_kinds_of_arguments_are_one_line_at_construction():
    g, d = nets()
    with pytest.raises(ConfigError, match=r"the network DCGANGenerator is a class: pass an instance"):
        GAN(DCGANGenerator, d)
    with pytest.raises(ConfigError, match="a network must be an nn.Module instance"):
        GAN(None, d)
    adam = torch.optim.Adam(g.parameters())
    with pytest.raises(ConfigError, match=r"g_optimizer must be a callable params -> optimizer.*not Adam"):
        GAN(g, d, g_optimizer=adam)
    with pytest.raises(ConfigError, match=r"d_optimizer must be a callable .*not str 'adam'"):
        GAN(g, d, d_optimizer="adam")
    model = GAN(g, d, loss=HingeLoss(), g_optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # objects it exports
    assert model.hparams["loss"] == "hinge"


def test_evaluate_generator_refuses_another_image_size(tmp_path):
    """A 16 px generator scored against 32 px statistics returned a number (FID 74) instead of refusing."""
    from gangen.classifier import save_classifier, train_classifier
    from gangen.inception import make_feature_extractor
    from gangen.metrics import evaluate_generator, real_statistics

    data = ImageDataModule(resolution=32, limit=256, batch_size=64)
    classifier, accuracy = train_classifier(data, epochs=1, enable_progress_bar=False, accelerator="cpu")
    extractor = make_feature_extractor(str(save_classifier(classifier, tmp_path / "clf.pt", accuracy=accuracy)))
    real = real_statistics(torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8), extractor)
    with pytest.raises(ConfigError, match=r"generated images \(1, 16, 16\) do not match the real statistics' "):
        evaluate_generator(nets()[0], 16, real, extractor)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"d_steps_per_g_step": 1.5}, "d_steps_per_g_step 1.5 must be an integer >= 1"),
        ({"reg_every": 2.5}, "reg_every 2.5 must be an integer >= 1"),
        ({"seed": "x"}, "seed 'x' must be an integer"),
        ({"ema_kimg": "10"}, "ema_kimg '10' must be a number"),
        ({"augment": ["color"]}, r"augment \['color'\] must be a string of comma-separated policies"),
    ],
)
def test_gan_arguments_of_the_wrong_type_are_one_line(kwargs, needle):
    """1.5 and 2.5 trained (as floats in the step schedule); the others were TypeError / AttributeError deep."""
    with pytest.raises(ConfigError, match=needle):
        GAN(*nets(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"lsun_classes": "bedroom"}, "lsun_classes 'bedroom' is invalid: use a list of names"),
        ({"hflip": "yes"}, "hflip 'yes' is invalid: use true or false"),
        ({"seed": "a"}, "seed 'a' is invalid: use an integer >= 0"),
    ],
)
def test_data_arguments_of_the_wrong_type_are_one_line(kwargs, needle):
    """'bedroom' was split into letters, 'yes' accepted, 'a' a TypeError when the first batch was built."""
    with pytest.raises(ConfigError, match=needle):
        ImageDataModule(**kwargs)


def test_a_mid_epoch_resume_does_not_warn_of_unreliable_results(tmp_path):
    """Lightning warned "your dataloader is not resumable ... unreliable results" at every mid-epoch resume;
    the datamodule's batches resume exactly (tests/test_resume.py), so the warning is dropped for them."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, ckpt_path=None) -> list[str]:
        model = GAN(*nets())
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, ImageDataModule(resolution=16, limit=256, batch_size=32), ckpt_path=ckpt_path)
        return [str(w.message) for w in caught]

    run(6)  # 3 of the epoch's 8 batches
    assert not [m for m in run(12, ckpt_path=tmp_path / "last.ckpt") if "not resumable" in m]


def test_a_negative_model_seed_is_still_accepted():
    assert GAN(*nets(), seed=-1).hparams["seed"] == -1  # older runs may have one


class _GlobalStream(L.Callback):
    """torch's global RNG state around each training batch."""

    def __init__(self) -> None:
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, *args) -> None:
        self.before = torch.get_rng_state()

    def on_train_batch_end(self, *args) -> None:
        self.states.append((self.before, torch.get_rng_state()))


def test_torch_streams_are_restored_by_a_resume_only(tmp_path):
    """A checkpoint's global RNG state (for dropout) is restored at a resumed fit's first step; a new fit of a
    module from load_from_checkpoint keeps its own seed's stream."""
    images = torch.rand(128, 1, 16, 16) * 2 - 1
    loader = DataLoader(TensorDataset(images), batch_size=32)
    model = GAN(*nets())
    fit = trainer(default_root_dir=tmp_path)
    fit.fit(model, loader)
    fit.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)["gangen"]["torch_rng_states"][0]
    torch.manual_seed(7)  # another stream than the checkpoint's
    probe = _GlobalStream()
    trainer(callbacks=[probe]).fit(GAN.load_from_checkpoint(tmp_path / "a.ckpt"), loader)
    assert all(torch.equal(a, b) for a, b in probe.states)  # nothing set the stream (no dropout draws either)
    probe = _GlobalStream()
    trainer(callbacks=[probe], max_steps=4).fit(GAN(*nets()), loader, ckpt_path=tmp_path / "a.ckpt")
    assert torch.equal(probe.states[0][1], saved) and all(torch.equal(a, b) for a, b in probe.states[1:])


def test_load_from_checkpoint_of_files_that_are_no_training_checkpoint_is_one_line(tmp_path, trained_ckpt):
    """GAN.load_from_checkpoint gave Lightning's KeyError 'pytorch-lightning_version' for a torch file of
    something else, and torch's long unpickling error for an export; gangen.load_generator says one line."""
    from gangen.errors import DataNotFoundError
    from gangen.sampling import export_safetensors, read_checkpoint

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ConfigError, match=r"^'.*other\.pt' is not a gangen checkpoint \(no generator config\)") as err:
        GAN.load_from_checkpoint(other)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained KeyError traceback
    lightning = tmp_path / "lightning.ckpt"  # another Lightning project's: GAN(**its hparams) was a TypeError
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}, "hyper_parameters": {"lr": 0.1}}, lightning)
    with pytest.raises(ConfigError, match=r"^'.*lightning\.ckpt' is not a gangen checkpoint \(no generator config\)"):
        GAN.load_from_checkpoint(lightning)
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"could not be loaded \(not a torch file"):
        GAN.load_from_checkpoint(text)
    with pytest.raises(DataNotFoundError, match=r"missing\.ckpt' not found"):
        GAN.load_from_checkpoint(tmp_path / "missing.ckpt")
    export, _ = export_safetensors(read_checkpoint(trained_ckpt), tmp_path / "g.safetensors")
    with pytest.raises(ConfigError, match=r"is an export \(the generator only\), not a training checkpoint: load it "
                       r"with gangen\.load_generator\("):  # fmt: skip
        GAN.load_from_checkpoint(str(export))
    assert isinstance(GAN.load_from_checkpoint(trained_ckpt), GAN)  # a real one still loads

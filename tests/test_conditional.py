"""Class-conditional G (label embedding), projection D, conditional training and `generate --class_label`."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, tiny_fit_args

from gangen import DCGANDiscriminator, DCGANGenerator
from gangen.errors import ConfigError
from gangen.networks import build_network, network_spec
from gangen.sampling import load_generator


@pytest.mark.parametrize("resolution,channels", [(16, 1), (32, 3)])
def test_conditional_shapes(resolution, channels):
    g = DCGANGenerator(latent_dim=8, resolution=resolution, channels=channels, base_channels=8, num_classes=10)
    d = DCGANDiscriminator(resolution=resolution, channels=channels, base_channels=8, num_classes=10, norm="spectral")
    z, y = torch.randn(5, 8), torch.tensor([0, 3, 9, 3, 1])
    x = g(z, y)
    assert x.shape == (5, channels, resolution, resolution)
    assert d(x, y).shape == (5,)
    assert g(z).shape == x.shape  # no labels: balanced classes 0, 1, 2, ...
    assert torch.equal(g.eval()(z), g(z, torch.arange(5)))
    rebuilt = build_network(network_spec(g))
    assert rebuilt.num_classes == 10


def test_labels_change_the_output():
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8, num_classes=4).eval()
    d = DCGANDiscriminator(resolution=16, channels=1, base_channels=8, num_classes=4).eval()
    z = torch.randn(1, 8).expand(4, 8)
    images = g(z, torch.arange(4))  # one z, four classes
    assert (images[0] - images[1]).abs().max() > 1e-4
    x = images[:1].expand(4, -1, -1, -1)
    logits = d(x, torch.arange(4))  # one image, four classes: only the projection term differs
    assert (logits - logits[0]).abs().max() > 0
    h = d.net[:-1](x[:1]).sum(dim=(2, 3))  # (1, C)
    torch.testing.assert_close(logits - logits[0], (d.embed.weight @ h[0]) - d.embed.weight[0] @ h[0])
    with pytest.raises(ValueError, match="needs labels"):
        d(x)


def test_dropout_and_bad_values():
    d = DCGANDiscriminator(resolution=16, channels=1, base_channels=8, dropout=0.3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in d.modules()) == 2
    with pytest.raises(ConfigError, match="dropout"):
        DCGANDiscriminator(resolution=16, dropout=1.5)
    with pytest.raises(ConfigError, match="num_classes -1"):
        DCGANGenerator(resolution=16, num_classes=-1)


def test_conditional_fit_and_generate_class(tmp_path):
    cond = ["--model.generator.init_args.num_classes", "10", "--model.discriminator.init_args.num_classes", "10"]
    result = run_cli(*tiny_fit_args(tmp_path, *cond, "--trainer.max_epochs", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    g = load_generator(ckpt)
    assert g.num_classes == 10 and g.embed.weight.shape == (10, 100)
    out = tmp_path / "class3.npz"
    result = run_cli("generate", "--ckpt_path", str(ckpt), "--output", str(out), "--num_samples", "4",
                     "--class_label", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    import numpy as np

    with torch.no_grad():
        expected = g(torch.randn(4, 100, generator=torch.Generator().manual_seed(0)), torch.full((4,), 3))
    got = torch.from_numpy(np.load(out)["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (4, 1, 32, 32)
    assert (got - expected).abs().max() < 1.5 / 127.5  # uint8 rounding only
    result = run_cli("generate", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "x.png"), "--class_label", "10")
    assert result.returncode == 2 and "--class_label 10" in result.stderr and "0..9" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_mismatched_conditioning_is_refused(tmp_path):
    result = run_cli(*tiny_fit_args(tmp_path, "--model.generator.init_args.num_classes", "10"))
    assert result.returncode == 2
    assert "num_classes=10 but discriminator num_classes=0" in result.stderr


def test_conditional_model_on_data_without_its_classes_is_refused(tmp_path):
    """Checked once the datamodule is set up (a folder's classes are its subfolders): a folder with no
    subfolders has no labels (every label was 0), and a label >= num_classes was an IndexError mid-step."""
    import lightning.pytorch as L
    import numpy as np
    from PIL import Image

    from gangen.data import ImageDataModule
    from gangen.system import GAN

    for i in range(8):
        Image.fromarray(np.full((16, 16), i * 30, np.uint8)).save(tmp_path / f"{i}.png")
    data = ImageDataModule(dataset="image_folder", root=str(tmp_path), resolution=16, channels=1, batch_size=4,
                           cache=False)  # fmt: skip
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8, num_classes=2)
    model = GAN(g, DCGANDiscriminator(resolution=16, channels=1, base_channels=8, num_classes=2))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ConfigError) as error:
        trainer.fit(model, datamodule=data)
    assert str(error.value) == (
        "the model is conditional on 2 classes but the data has no class labels: use an unconditional model "
        "(num_classes 0) or data with classes"
    )


def test_default_classes_follow_the_image_index_not_the_batch(inception_weights):
    """Without labels, image i of a set gets class i % num_classes: restarting at 0 in every batch (and in
    every rank's share of a metric's samples) gave 10k images at batch 64 an uneven class mix (1094 vs 937)
    and made an image's class depend on batch_size and on the number of processes."""
    from gangen.inception import make_feature_extractor
    from gangen.metrics import generated_features
    from gangen.sampling import generate

    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8, num_classes=3)
    seen: list[torch.Tensor] = []
    g.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))  # (z, labels) per call
    z = torch.randn(10, 8)
    generate(g, 10, z=z, batch_size=4)
    assert [len(s) for s in seen] == [4, 4, 2] and torch.equal(torch.cat(seen), torch.arange(10) % 3)
    seen.clear()
    extractor = make_feature_extractor("inception", inception_weights)
    whole = generated_features(g, z, extractor, batch_size=4)["pool"]  # (10, 2048)
    shares = [
        generated_features(g, z[a:b], extractor, batch_size=4, label_offset=a)["pool"] for a, b in ((0, 3), (3, 10))
    ]
    assert torch.equal(torch.cat(seen), torch.cat([torch.arange(10), torch.arange(10)]) % 3)  # as 2 ranks would
    torch.testing.assert_close(torch.cat(shares), whole, rtol=0, atol=1e-5)

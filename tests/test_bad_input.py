"""More bad input (issue 7), beyond test_errors.py: each is one line naming the value and the fix, exit
status 2, and no output left behind. Corrupt image files fail naming the file (not skipped): a GAN trained
on a silently thinned folder is a different experiment."""

from __future__ import annotations

import pytest
import torch
from conftest import DEMO_CONFIG, fails
from PIL import Image

READ_ONLY = "/proc/sys"  # not writable even by root (unlike a chmod-ed folder)


def fit_args(save_dir, *extra: str) -> list[str]:
    return ["fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.default_root_dir", str(save_dir), "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--data.limit", "64", *extra]  # fmt: skip


def image_folder(tmp_path, bad: bytes | None) -> list[str]:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("L", (32, 32), color=40 * i).save(root / f"ok{i}.png")
    if bad is not None:
        (root / "bad.png").write_bytes(bad)
    return ["--data.dataset", "image_folder", "--data.root", str(root), "--data.batch_size", "4"]


def test_empty_image_folder(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    line = fails(capsys, *fit_args(tmp_path / "runs", "--data.dataset", "image_folder",
                                   "--data.root", str(tmp_path / "images")))  # fmt: skip
    assert f"no images in {tmp_path / 'images'}" in line and "--data.root" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_fails_naming_the_file(capsys, tmp_path, kind):
    good = tmp_path / "good.png"
    Image.effect_noise((32, 32), 50).save(good)
    bad = b"not an image at all" if kind == "garbage" else good.read_bytes()[: len(good.read_bytes()) // 2]
    line = fails(capsys, *fit_args(tmp_path / "runs", *image_folder(tmp_path, bad)))
    assert f"cannot decode image {tmp_path / 'images' / 'bad.png'}" in line and "delete or replace" in line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # no checkpoint from a broken run


def test_channels_do_not_match_checkpoint(capsys, tmp_path, trained_ckpt):
    line = fails(capsys, *fit_args(tmp_path, "--ckpt_path", str(trained_ckpt), "--data.channels", "3"))
    assert "data.channels=3" in line and "channels=1" in line and "--data.channels 1" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem", ["missing", "truncated", "foreign"])
def test_fit_resume_from_bad_checkpoint(capsys, tmp_path, trained_ckpt, problem):
    ckpt = tmp_path / "in" / f"{problem}.ckpt"
    ckpt.parent.mkdir()
    if problem == "truncated":
        ckpt.write_bytes(trained_ckpt.read_bytes()[:5000])
    elif problem == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ckpt)
    line = fails(capsys, *fit_args(tmp_path / "runs", "--ckpt_path", str(ckpt)))
    expected = {
        "missing": "not found",
        "truncated": "a damaged or truncated torch file",
        "foreign": "not a gangen checkpoint",
    }
    assert str(ckpt) in line and expected[problem] in line
    assert not (tmp_path / "runs").exists()


def test_export_missing_checkpoint(capsys, tmp_path):
    line = fails(
        capsys, "export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "g.safetensors")
    )
    assert "nope.ckpt" in line and "not found" in line
    assert list(tmp_path.iterdir()) == []


def test_export_output_suffix(capsys, tmp_path, trained_ckpt):
    line = fails(capsys, "export", "--ckpt_path", str(trained_ckpt), "--output", str(tmp_path / "g.pt"))
    assert "g.pt" in line and "end it with .safetensors" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "export"])
def test_output_in_read_only_folder(capsys, trained_ckpt, command):
    output = f"{READ_ONLY}/gangen-{command}." + ("png" if command == "generate" else "safetensors")
    line = fails(capsys, command, "--ckpt_path", str(trained_ckpt), "--output", output)
    assert output in line and "is not writable" in line and "choose another location" in line


def test_too_few_samples_for_fid(capsys, tmp_path, trained_ckpt):
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--num_samples", "1",
                 "--output", str(tmp_path / "m.json"))  # fmt: skip
    assert "--num_samples 1 must be >= 2" in line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_without_inception_weights(capsys, tmp_path, trained_ckpt, monkeypatch):
    monkeypatch.delenv("GANGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--num_samples", "8",
                 "--output", str(tmp_path / "m.json"))  # fmt: skip
    assert "Inception weights not found" in line and "gangen download-weights" in line
    assert "pass --inception_weights PATH" in line  # evaluate's option (the message named fit's --metrics.*)
    assert not (tmp_path / "m.json").exists()


def test_evaluate_a_checkpoint_without_data_settings_takes_them_from_the_flags(capsys, tmp_path, trained_ckpt):
    """A checkpoint trained from Python without a datamodule records no data: evaluate asks for --data.*,
    and refused them even when given."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    del ckpt["datamodule_hyper_parameters"]
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    common = ["evaluate", "--ckpt_path", str(bare), "--num_samples", "8", "--num_real", "8", "--output",
              str(tmp_path / "m.json"), "--feature_extractor", str(tmp_path / "none.pt")]  # fmt: skip
    assert "does not record its data: pass --data.dataset" in fails(capsys, *common)
    line = fails(capsys, *common, "--data.dataset", "fashion_mnist", "--data.resolution", "32", "--data.channels", "1")
    assert "does not record its data" not in line and "none.pt" in line  # past the data: the extractor file


def test_generate_from_corrupt_safetensors(capsys, tmp_path):
    bad = tmp_path / "g.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    line = fails(capsys, "generate", "--ckpt_path", str(bad), "--output", str(tmp_path / "g.png"))
    assert str(bad) in line and "not a generator file from `gangen export`" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]

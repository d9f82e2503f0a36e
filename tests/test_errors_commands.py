"""One-line refusals of gangen's own commands (train-classifier, generate, export, download-weights, evaluate
--samples), each before any training, download or write: the values a CLI fuzz found as tracebacks, as
refusals after 15 s of training, or as "not found" for a path that exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SilentServer, assert_fit_refused, fails, tiny_fit_args
from PIL import Image

from gangen import inception

READ_ONLY = "/proc/sys"  # not writable even by root (unlike a chmod-ed folder)
TRAIN_CLASSIFIER = ["train-classifier", "--data.limit", "64", "--data.batch_size", "32", "--epochs", "1"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--output", f"{READ_ONLY}/clf.pt"], f"--output '{READ_ONLY}/clf.pt': folder {READ_ONLY} is not writable"),
        (["--width", "0"], "--width 0 must be >= 1"),
        (["--lr", "0"], "--lr 0 must be > 0"),
        (["--seed", "-1"], "--seed -1 is out of range: use 0 to 2**32 - 1"),
        (["--accelerator", "bogus"], "--accelerator 'bogus' is not an accelerator name: use cpu, gpu or auto"),
    ],
)
def test_train_classifier_refuses_before_training(capsys, tmp_path, args, needle):
    """Each was found after training (15 s) or mid-training, as a traceback."""
    line = fails(capsys, *TRAIN_CLASSIFIER, "--output", str(tmp_path / "clf.pt"), *args)
    assert needle in line
    assert list(tmp_path.iterdir()) == []


def test_train_classifier_output_folder_is_refused_before_training(capsys, tmp_path):
    line = fails(capsys, *TRAIN_CLASSIFIER, "--accelerator", "cpu", "--output", str(tmp_path))
    assert line == (
        f"gangen: error: --output {str(tmp_path)!r} is a folder: pass a file name (e.g. {tmp_path}/classifier.pt)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_train_classifier_gpu_without_one_says_so_as_fit_does(capsys, tmp_path):
    line = fails(capsys, *TRAIN_CLASSIFIER, "--accelerator", "gpu", "--output", str(tmp_path / "clf.pt"))
    assert line == (
        "gangen: error: --accelerator gpu: no CUDA GPU is available on this machine; use --accelerator cpu (or auto)"
    )


def test_a_checkpoint_folder_is_called_a_folder_and_the_file_is_named(capsys, tmp_path, trained_run, trained_ckpt):
    """generate / export / evaluate said `checkpoint '<folder>' not found`."""
    out = tmp_path / "out"
    out.mkdir()
    expected = f"gangen: error: checkpoint {str(trained_run)!r} is a folder: pass the .ckpt file (e.g. {trained_ckpt})"
    assert fails(capsys, "generate", "--ckpt_path", str(trained_run), "--output", str(out / "g.png")) == expected
    assert fails(capsys, "export", "--ckpt_path", str(trained_run), "--output", str(out / "g.safetensors")) == expected
    assert fails(capsys, "evaluate", "--ckpt_path", str(trained_run), "--output", str(out / "m.json")) == expected
    empty = tmp_path / "run.ckpt"  # a folder with no checkpoint in it: the usual place is named
    empty.mkdir()
    line = fails(capsys, "generate", "--ckpt_path", str(empty), "--output", str(out / "g.png"))
    assert line.endswith(f"is a folder: pass the .ckpt file (e.g. {empty}/checkpoints/last.ckpt)")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
def test_fit_from_a_checkpoint_folder_is_called_a_folder(capsys, tmp_path, trained_run, trained_ckpt, option):
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    needle = f"checkpoint {str(trained_run)!r} is a folder: pass the .ckpt file (e.g. {trained_ckpt})"
    assert_fit_refused(capsys, save_dir, [option, str(trained_run)], [needle])


def test_samples_that_are_a_file_but_not_an_npz_say_what_they_are(capsys, tmp_path):
    """evaluate --samples said `samples '...' not found` for an existing file."""
    text = tmp_path / "text.ckpt"
    text.write_text("hello\n")
    line = fails(capsys, "evaluate", "--samples", str(text))
    assert line == (
        f"gangen: error: samples {str(text)!r} is a .ckpt file, not an .npz or a folder: pass a folder of images or "
        "an .npz from `gangen generate`; a checkpoint goes to --ckpt_path"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["text.ckpt"]


def _edited(trained_ckpt: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the trained checkpoint whose state_dict went through edit(state_dict)."""
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    edit(ckpt["state_dict"])
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_weights_that_do_not_match_their_own_config_are_one_line(capsys, tmp_path, trained_ckpt):
    """A state_dict with a first conv cut to one row (a damaged file): a size-mismatch RuntimeError traceback."""

    def cut(state: dict) -> None:
        for key in [k for k in state if k.endswith("net.0.weight") and k.startswith("generator")]:
            state[key] = state[key][:1].clone()

    bad = _edited(trained_ckpt, tmp_path, "badshape.ckpt", cut)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["generate", "--output", str(out / "g.png")], ["export", "--output", str(out / "g.safetensors")],
                 ["evaluate", "--output", str(out / "m.json")]):  # fmt: skip
        line = fails(capsys, argv[0], "--ckpt_path", str(bad), *argv[1:])
        assert line.startswith(
            f"gangen: error: checkpoint {str(bad)!r}: its weights do not match its own network config (size mismatch "
            "for generator"
        ), line
        assert ".net.0.weight: (1, " in line
        assert line.endswith("): the file is damaged or from another gangen version"), line
    assert list(out.iterdir()) == []


def test_a_checkpoint_without_generator_weights_is_named(capsys, tmp_path, trained_ckpt):
    def drop(state: dict) -> None:
        for key in [k for k in state if k.startswith("generator")]:
            del state[key]

    nogen = _edited(trained_ckpt, tmp_path, "nogen.ckpt", drop)
    expected = (
        f"gangen: error: checkpoint {str(nogen)!r} holds no generator weights (a damaged or hand-edited file): pass "
        "a checkpoint from `gangen fit`"
    )
    assert fails(capsys, "generate", "--ckpt_path", str(nogen), "--output", str(tmp_path / "g.png")) == expected
    assert fails(capsys, "export", "--ckpt_path", str(nogen), "--output", str(tmp_path / "g.safetensors")) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["nogen.ckpt"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--device", "meta"], "--device 'meta' is not a usable device (it holds shapes, no data): use cpu or cuda"),
        (["--seed", "-1"], "--seed -1 is out of range: use 0 to 2**64 - 1"),
    ],
)
def test_generate_device_and_seed_refusals(capsys, tmp_path, trained_ckpt, args, expected):
    """--device meta was a NotImplementedError traceback; --seed -1 was taken although the range says 0 to 2**64-1."""
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--output", str(tmp_path / "g.png"), *args)
    assert line == f"gangen: error: {expected}"
    assert list(tmp_path.iterdir()) == []


def test_a_grid_larger_than_its_format_allows_is_one_line_before_writing(capsys, tmp_path, trained_ckpt):
    """A 2000-image JPEG row (68002 px; libjpeg allows 65500) printed libjpeg's own line, then ours."""
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "2000", "--nrow", "2000",
                 "--output", str(tmp_path / "g.jpg"))  # fmt: skip
    assert line == (
        "gangen: error: --nrow 2000: a row of 2000 images is 68002 px wide and JPEG allows 65500: lower --nrow "
        "(at most 1926 here)"
    )
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "500", "--nrow", "1",
                 "--output", str(tmp_path / "g.webp"))  # fmt: skip
    assert line.endswith("500 rows of 1 images make a grid 17002 px tall and WebP allows 16383: raise --nrow, write "
                         "fewer samples, or write a folder DIR/ or an .npz")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_export_to_an_existing_folder_is_refused(capsys, tmp_path, trained_ckpt):
    folder = tmp_path / "g.safetensors"
    folder.mkdir()
    line = fails(capsys, "export", "--ckpt_path", str(trained_ckpt), "--output", str(folder))
    assert line == (
        f"gangen: error: --output {str(folder)!r} is a folder: pass a file name (e.g. {folder}/generator.safetensors)"
    )
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dest", f"{READ_ONLY}/w.pth"], f"--dest '{READ_ONLY}/w.pth': folder {READ_ONLY} is not writable"),
        (["--dest", "{tmp}"], "--dest '{tmp}' is a folder: pass a file name (e.g. {tmp}/weights-inception-2015-"),
        (["--timeout", "0"], "--timeout 0 must be a finite number of seconds > 0"),
        (["--timeout", "-1"], "--timeout -1 must be a finite number of seconds > 0"),
    ],
)
def test_download_weights_refuses_before_connecting(capsys, tmp_path, monkeypatch, args, expected):
    """Found only after a connection (or, with no network, reported as a network failure). The URL is a
    loopback server that never answers: the refusal must come before any connection to it."""
    download = inception.download_inception_weights
    with SilentServer() as server:
        monkeypatch.setattr(download, "__defaults__", (*download.__defaults__[:-1], f"{server.url}/w.pth"))
        args = [a.replace("{tmp}", str(tmp_path)) for a in args]
        dest = [] if "--dest" in args else ["--dest", str(tmp_path / "w.pth")]
        line = fails(capsys, "download-weights", *dest, "--timeout", "2", *args)
    assert line.startswith("gangen: error: " + expected.replace("{tmp}", str(tmp_path))), line
    assert server.connections == 0
    assert list(tmp_path.iterdir()) == []


def _cache_env_line(value: Path) -> str:
    return (
        f"gangen: error: $GANGEN_CACHE_DIR {str(value)!r} is a file: set it to a folder, or unset it for "
        "~/.cache/gangen (gangen's cache of decoded datasets and real statistics)"
    )


@pytest.mark.parametrize("uses", ["metrics", "decoded"])
def test_fit_with_the_cache_variable_naming_a_file_is_one_line(capsys, tmp_path, monkeypatch, classifier_file, uses):
    """A real-statistics or decoded-dataset cache under $GANGEN_CACHE_DIR=FILE was a NotADirectoryError traceback
    at the first evaluation (or at setup), after the run folder was written."""
    file = tmp_path / "cachefile"
    file.write_text("not a folder\n")
    monkeypatch.setenv("GANGEN_CACHE_DIR", str(file))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("L", (32, 32), color=40 * i).save(images / f"{i}.png")
    extra = {
        "metrics": ["--metrics.feature_extractor", str(classifier_file)],
        "decoded": ["--data.dataset", "image_folder", "--data.root", str(images), "--data.batch_size", "2"],
    }[uses]
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    line = fails(capsys, *tiny_fit_args(save_dir, "--trainer.default_root_dir", str(save_dir), *extra))
    assert line == _cache_env_line(file)
    assert list(save_dir.iterdir()) == [] and file.read_text() == "not a folder\n"
    monkeypatch.setenv("GANGEN_CACHE_DIR", str(file / "sub"))  # a folder that cannot be made under the file
    line = fails(capsys, *tiny_fit_args(save_dir, "--trainer.default_root_dir", str(save_dir), *extra))
    assert line.startswith(f"gangen: error: $GANGEN_CACHE_DIR {str(file / 'sub')!r}: {file} is a file, so it cannot")
    assert list(save_dir.iterdir()) == []


def test_evaluate_with_the_cache_variable_naming_a_file_is_one_line(
    capsys, tmp_path, monkeypatch, trained_ckpt, classifier_file
):
    """Was a NotADirectoryError traceback after the real images had gone through the extractor."""
    file = tmp_path / "cachefile"
    file.write_text("")
    monkeypatch.setenv("GANGEN_CACHE_DIR", str(file))
    out = tmp_path / "out"
    out.mkdir()
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--feature_extractor", str(classifier_file),
                 "--num_samples", "16", "--num_real", "16", "--output", str(out / "m.json"))  # fmt: skip
    assert line == _cache_env_line(file)
    assert list(out.iterdir()) == []


def test_a_feature_extractor_folder_is_called_a_folder(capsys, tmp_path, trained_ckpt, classifier_file):
    """evaluate --feature_extractor FOLDER said "unknown feature extractor" (FOLDER.pt: "not found"); fit's
    --metrics.feature_extractor said "not found"."""
    out = tmp_path / "out"
    out.mkdir()
    evaluate = ["evaluate", "--ckpt_path", str(trained_ckpt), "--output", str(out / "m.json"), "--feature_extractor"]
    empty = tmp_path / "clf.pt"  # a folder named like the file
    empty.mkdir()
    assert fails(capsys, *evaluate, str(empty)) == (
        f"gangen: error: feature extractor {str(empty)!r} is a folder: pass the classifier file (a .pt written by "
        "`gangen train-classifier --output FILE.pt`)"
    )
    holder = classifier_file.parent
    expected = f"gangen: error: feature extractor {str(holder)!r} is a folder: pass the classifier file (e.g. "
    assert fails(capsys, *evaluate, str(holder)) == f"{expected}{classifier_file})"
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    assert_fit_refused(capsys, save_dir, ["--metrics.feature_extractor", str(holder)], [expected])
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["m.png", "metrics", "m.json.txt"])
def test_evaluate_output_other_than_json_is_refused(capsys, tmp_path, trained_ckpt, name):
    """evaluate writes JSON only: --output m.png wrote JSON into a .png, after the whole evaluation."""
    output = str(tmp_path / name)
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--output", output, "--num_samples", "8",
                 "--num_real", "8", "--feature_extractor", str(tmp_path / "no-such-classifier.pt"))  # fmt: skip
    example = str(tmp_path / name).removesuffix(".png").removesuffix(".txt") + ".json"
    assert line == f"gangen: error: --output {output!r}: evaluate writes JSON; end it with .json (e.g. {example})"
    assert list(tmp_path.iterdir()) == []


def test_evaluate_output_folder_is_refused_before_evaluating(capsys, tmp_path, trained_ckpt, classifier_file):
    """An existing folder was an IsADirectoryError traceback after the evaluation."""
    line = fails(capsys, "evaluate", "--ckpt_path", str(trained_ckpt), "--output", str(tmp_path), "--num_samples",
                 "8", "--num_real", "8", "--feature_extractor", str(classifier_file))  # fmt: skip
    assert line == (
        f"gangen: error: --output {str(tmp_path)!r} is a folder: pass a file name (e.g. {tmp_path}/metrics.json)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_trailing_slash_on_a_file_output_is_refused_before_the_checkpoint_is_read(capsys, tmp_path):
    """export --output x.safetensors/ was called an existing folder and pointed into it (x.safetensors/generator.
    safetensors, a folder that does not exist). generate keeps DIR/ as a PNG folder (test_cli)."""
    missing = str(tmp_path / "none.ckpt")  # never read: the output is refused first
    output = f"{tmp_path}/x.safetensors/"
    assert fails(capsys, "export", "--ckpt_path", missing, "--output", output) == (
        f"gangen: error: --output {output!r} ends with '/', which names a folder: pass a file name (e.g. "
        f"{tmp_path}/x.safetensors)"
    )
    output = f"{tmp_path}/new/"
    assert fails(capsys, *TRAIN_CLASSIFIER, "--output", output).endswith(f"(e.g. {tmp_path}/new/classifier.pt)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["g.npz", "g.png", "dir/"])
def test_generate_more_than_memory_holds_is_one_line_with_the_size(capsys, tmp_path, trained_ckpt, output):
    """generate holds every image and latent in memory: 10**12 images were a DefaultCPUAllocator traceback
    (100000000 on a 23 GiB machine too)."""
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", str(10**12),
                 "--output", f"{tmp_path}/{output}")  # fmt: skip
    dtype = "float32" if output == "g.png" else "uint8"
    assert line.startswith(
        f"gangen: error: --num_samples {10**12}: generate holds all {10**12} images (1x32x32 {dtype}) and their "
        "latents in memory, about "
    ), line
    assert "more than this machine's " in line
    assert line.endswith("run generate several times with different --seed values")
    assert list(tmp_path.iterdir()) == []


def test_an_npz_larger_than_the_free_disk_is_one_line_with_the_size(capsys, tmp_path, trained_ckpt, monkeypatch):
    """An npz is written whole (uncompressed): one larger than the free space failed only once written."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10_000, 10_000))
    output = str(tmp_path / "g.npz")
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "64", "--output", output)
    assert line == (
        f"gangen: error: --output {output!r}: 64 images of 1x32x32 uint8 make an npz of about 64.0 KiB and "
        f"{tmp_path} has 9.8 KiB free: lower --num_samples (at most about 9 images fit), or write it to another disk"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_a_network_outside_gangen_names_the_python_way(capsys, tmp_path, trained_ckpt):
    """A checkpoint of the user's own generator class: the CLI never imports a module a checkpoint names, and its
    line said "import the module that defines it", which a CLI user cannot do (a README review)."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["generator"]["class_path"] = "mynets.MyGenerator"
    torch.save(ckpt, tmp_path / "own.ckpt")
    line = fails(capsys, "generate", "--ckpt_path", str(tmp_path / "own.ckpt"), "--output", str(tmp_path / "g.png"))
    assert line == (
        "gangen: error: network class_path 'mynets.MyGenerator' is not a torch.nn.Module subclass of an imported "
        "module: import the module that defines it before loading (gangen's commands load gangen's own networks "
        "only: from Python, import it, then gangen.load_generator)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.ckpt"]

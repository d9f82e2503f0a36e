"""`gangen generate` and gangen.generate: what is written, for any count, and the refusals and cleanups."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, fails
from PIL import Image

from gangen import DCGANGenerator, generate, load_generator
from gangen.cache_dir import creation_mode
from gangen.errors import ConfigError
from gangen.networks import network_spec
from gangen.sampling import interpolation_latents, latents, save_grid, slerp, to_uint8


def run(*argv: str) -> None:
    from gangen.cli import main

    main(list(argv))


def npz(path) -> np.ndarray:
    with np.load(path) as f:
        return f["arr_0"]


def test_image_i_does_not_depend_on_the_count(trained_ckpt, tmp_path):
    """torch's CPU sampler draws the last values of a tensor whose size is not a multiple of 16 another way:
    latent 9 of 10 differed from latent 9 of 50, and the last PNG of a preview from the same image of a set."""
    assert torch.equal(latents(10, 100)[9], latents(50, 100)[9]) and torch.equal(latents(1, 7)[0], latents(64, 7)[0])
    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "10", "--output", f"{tmp_path}/pngs/")
    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "50", "--batch_size", "7",
        "--output", str(tmp_path / "s.npz"))  # fmt: skip
    array = npz(tmp_path / "s.npz")
    for i in (0, 9):
        with Image.open(tmp_path / "pngs" / f"{i:06d}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), array[i, ..., 0])


def test_upper_case_npz_suffix_holds_the_array(trained_ckpt, tmp_path):
    """np.savez appends .npz to a name not ending in lower-case .npz: x.NPZ was written empty, the array went
    to a hidden stray file."""
    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "5", "--output", str(tmp_path / "x.NPZ"))
    assert npz(tmp_path / "x.NPZ").shape == (5, 32, 32, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["x.NPZ"]


def test_an_upper_case_npz_is_read_back_by_evaluate(trained_ckpt, tmp_path):
    """`evaluate --samples x.NPZ` looked for a folder and said the samples were not found."""
    from gangen.commands import load_samples

    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "3", "--output", str(tmp_path / "x.NPZ"))
    expected = torch.from_numpy(npz(tmp_path / "x.NPZ")).permute(0, 3, 1, 2)
    assert torch.equal(load_samples(str(tmp_path / "x.NPZ")), expected)


def test_a_diverged_generator_is_refused_not_written_black(capsys, tmp_path):
    """NaN weights gave NaN images, written as black pixels (and scored by FID) without a word."""
    from gangen.errors import DivergenceError

    g, ckpt = _conditional_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["generator_ema.net.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(saved, ckpt)
    from gangen.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", str(ckpt), "--num_samples", "10", "--output", str(tmp_path / "s.npz")])
    assert exit_info.value.code == 3
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"checkpoint {str(ckpt)!r}: its EMA generator holds nan/inf in net.0.weight" in line
    assert line.endswith("use an earlier checkpoint") and not (tmp_path / "s.npz").exists()
    assert generate(load_generator(ckpt, ema=False), 10).isfinite().all()  # the trained G is fine
    with torch.no_grad():  # finite weights, non-finite images (an inf batchnorm statistic): generate refuses
        g.net[1].running_var.fill_(float("-inf"))
    with pytest.raises(DivergenceError, match="NaN or inf in 10 of 10 images"):
        generate(g, 10, batch_size=3, uint8=True)
    assert generate(g, 4, check_finite=False).shape == (4, 1, 16, 16)  # training's grids and metrics


def test_uint8_batches_equal_the_float_path(trained_ckpt, tmp_path):
    g = load_generator(trained_ckpt)
    images = generate(g, 37, seed=3, batch_size=8)
    small = generate(g, 37, seed=3, batch_size=5, uint8=True)
    assert small.dtype == torch.uint8 and small.shape == (37, 1, 32, 32)
    np.testing.assert_array_equal(to_uint8(small), to_uint8(images))
    save_grid(images, tmp_path / "a.png")
    save_grid(small, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_png_folder_has_the_mode_mkdir_gives(trained_ckpt, tmp_path):
    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "2", "--output", f"{tmp_path}/pngs/")
    assert stat.S_IMODE((tmp_path / "pngs").stat().st_mode) == creation_mode(0o777)  # mkdtemp's was 0700


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "foo"], "--device 'foo' is not a device name"),
        (["--nrow", "0"], "--nrow 0 must be > 0"),
        (["--nrow", "-3"], "--nrow -3 must be > 0"),
        (["--seed", str(2**64)], f"seed {2**64} is out of range: use 0 to 2**64 - 1"),
    ],
)
def test_bad_generate_options_are_one_line(capsys, trained_ckpt, tmp_path, args, needle):
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--output", str(tmp_path / "g.png"), *args)
    assert needle in line
    assert list(tmp_path.iterdir()) == []


def test_folder_outputs_are_checked_before_generating(capsys, tmp_path):
    """A folder already holding PNGs was refused only after every image was generated; a file named as a
    folder was a NotADirectoryError. Both are refused before the checkpoint is read (here: none exists)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "000000.png").write_bytes(b"x")
    (tmp_path / "file.txt").write_text("x")
    missing = str(tmp_path / "no.ckpt")
    line = fails(capsys, "generate", "--ckpt_path", missing, "--output", f"{tmp_path}/full/")
    assert "already holds PNG files" in line
    line = fails(capsys, "generate", "--ckpt_path", missing, "--output", f"{tmp_path}/file.txt/")
    assert "file.txt is a file, not a folder" in line


def test_write_failures_are_one_line_and_leave_nothing(capsys, trained_ckpt, tmp_path):
    # a grid larger than WebP allows (16383 px): refused before generating (PIL's ValueError came at the write)
    line = fails(capsys, "generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "600", "--nrow", "600",
                 "--output", str(tmp_path / "g.webp"))  # fmt: skip
    assert "--nrow 600" in line and "20402 px wide and WebP allows 16383" in line and "lower --nrow" in line
    assert list(tmp_path.iterdir()) == []
    # a file size limit (ulimit -f; Python ignores SIGXFSZ, so the write fails with EFBIG): a full disk likewise
    code = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); import runpy, sys; \
sys.argv = ['cli.py', 'generate', '--ckpt_path', {str(trained_ckpt)!r}, '--num_samples', '100', '--output', \
{str(tmp_path / 's.npz')!r}]; runpy.run_path({str(ROOT / 'cli.py')!r}, run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"gangen: error: --output {str(tmp_path / 's.npz')!r} could not be written (File too large); nothing was "
        "left there: free space, or choose fewer samples or another location or format"
    ]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_a_png_folder_leaves_nothing(trained_ckpt, tmp_path):
    """SIGTERM killed the process at once: a hidden half-written folder stayed behind. Now it is cleaned up
    like Ctrl-C, exit status 143."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "generate", "--ckpt_path", str(trained_ckpt), "--num_samples",
         "40000", "--output", f"{tmp_path}/pngs/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(len(os.listdir(p)) > 10 for p in tmp_path.glob(".pngs.*")):
        time.sleep(0.05)
    assert any(tmp_path.glob(".pngs.*")), "the writer never started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert list(tmp_path.iterdir()) == []


def _angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angles (radians) between the rows of x and y (or a vector y)."""
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))


def test_generate_and_the_extractors_run_without_tf32_whatever_the_global_setting(classifier_file):
    """cuDNN's default TF32 convolutions (Ampere and later) moved generated images by ~1e-3 relative against the CPU,
    enough to flip uint8 pixels and so the FID of one checkpoint between cards. The flags are off while the
    generator and the classifier extractor run, and restored after (on this CPU machine only the flags can be
    checked, not TF32 itself)."""
    from gangen.classifier import ClassifierExtractor

    seen = []

    def record(module, inputs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    generator = DCGANGenerator(resolution=16, channels=1, latent_dim=4, base_channels=4)
    generator.register_forward_pre_hook(record)
    extractor = ClassifierExtractor(classifier_file)
    extractor.classifier.register_forward_pre_hook(record)
    extractor.classifier.body.register_forward_pre_hook(record)  # features() runs the body alone
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        generate(generator, 3, batch_size=2)
        extractor.features(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
        assert seen == [(False, False)] * 3  # two generator batches, one extractor pass
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_slerp_walks_the_arc_between_its_end_points_at_constant_speed():
    a, b = latents(2, 64, seed=1).double()
    b = b * a.norm() / b.norm()  # equal norms: slerp's path is the arc of radius |a| from a to b
    omega = _angles(a, b)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    path = slerp(a, b, t)
    assert path.shape == (9, 64)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), a.norm().expand(9))  # on the sphere
    torch.testing.assert_close(_angles(path, a), t * omega)  # at angle t * omega from a ...
    torch.testing.assert_close(_angles(path[1:], path[:-1]), (omega / 8).expand(8))  # ... in equal steps
    plane = torch.linalg.qr(torch.stack([a, b], 1)).Q  # (64, 2): in the plane of a and b
    torch.testing.assert_close(path @ plane @ plane.T, path)
    torch.testing.assert_close(slerp(a, 2 * a, t), (1 + t)[:, None] * a)  # parallel ends: a straight line


def test_interpolation_strips_run_by_slerp_between_the_seeded_end_latents():
    """Strip r goes from latents(2 * rows, D, seed)[2r] to [2r + 1]; each frame is the slerp formula at
    t = k / (K - 1), computed here in float64."""
    rows, steps, dim, seed = 3, 7, 64, 4
    z = interpolation_latents(rows, steps, dim, seed)
    assert z.shape == (rows * steps, dim)
    ends = latents(2 * rows, dim, seed).double().numpy()
    t = np.linspace(0, 1, steps)[:, None]
    for r, strip in enumerate(z.double().view(rows, steps, dim)):
        a, b = ends[2 * r], ends[2 * r + 1]
        omega = np.arccos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        expected = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
        np.testing.assert_allclose(strip.numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(strip[[0, -1]].numpy(), np.stack([a, b]), rtol=0, atol=1e-5)
        from_a, from_b = _angles(strip, torch.from_numpy(a)), _angles(strip, torch.from_numpy(b))
        assert (from_a.diff() > 0).all() and (from_b.diff() < 0).all()  # each frame a step further from a, on to b
        distances = torch.cdist(strip, strip) + torch.eye(steps) * 1e9
        assert distances.min() > 0.1  # frames pairwise different


def _conditional_checkpoint(tmp_path):
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8, num_classes=3)
    state = {f"generator.{k}": v for k, v in g.state_dict().items()}
    ema = {f"generator_ema.{k}": v * 0.5 if v.is_floating_point() else v for k, v in g.state_dict().items()}
    torch.save({"hyper_parameters": {"generator": network_spec(g)}, "state_dict": state | ema}, tmp_path / "c.ckpt")
    return g.eval(), tmp_path / "c.ckpt"


def test_gangen_debug_keeps_the_divergence_exit_status(capsys, monkeypatch, tmp_path):
    """GANGEN_DEBUG=1 on a diverged generator: the traceback, the one line, and exit status 3 as without it
    (a bare `raise` made it 1)."""
    from gangen.cli import main

    g, ckpt = _conditional_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["generator_ema.net.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(saved, ckpt)
    monkeypatch.setenv("GANGEN_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", str(ckpt), "--num_samples", "10", "--output", str(tmp_path / "s.npz")])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and any("DivergenceError" in line for line in err), err
    assert err[-1].startswith("gangen: error: ") and not (tmp_path / "s.npz").exists()


def test_conditional_strips_keep_one_class_and_no_ema_takes_the_trained_weights(capsys, tmp_path):
    """Strips of a conditional model changed class at every frame (image i had class i mod classes)."""
    g, ckpt = _conditional_checkpoint(tmp_path)
    run("generate", "--ckpt_path", str(ckpt), "--interpolate", "3", "--num_samples", "4", "--no_ema",
        "--output", str(tmp_path / "s.npz"))  # fmt: skip
    assert "wrote 12 images" in capsys.readouterr().out.splitlines()[-1]
    z = interpolation_latents(4, 3, 8, seed=0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(npz(tmp_path / "s.npz"), to_uint8(generate(g, 12, z=z, labels=labels)))
    run("generate", "--ckpt_path", str(ckpt), "--num_samples", "4", "--output", str(tmp_path / "e.npz"))
    assert capsys.readouterr().out.strip().endswith("(EMA generator)")
    ema = load_generator(ckpt)
    assert torch.equal(ema.net[0].weight, g.net[0].weight * 0.5)
    np.testing.assert_array_equal(npz(tmp_path / "e.npz"), to_uint8(generate(ema, 4)))
    with np.load(tmp_path / "s.npz") as f, np.load(tmp_path / "e.npz") as e:  # the classes ride along as arr_1
        assert f.files == ["arr_0", "arr_1"] and f["arr_1"].tolist() == labels.tolist()
        assert e["arr_1"].dtype == np.int64 and e["arr_1"].tolist() == [0, 1, 2, 0]
    run("generate", "--ckpt_path", str(ckpt), "--num_samples", "3", "--class_label", "2",
        "--output", str(tmp_path / "k.npz"))  # fmt: skip
    with np.load(tmp_path / "k.npz") as f:
        assert f["arr_1"].tolist() == [2, 2, 2]


def test_python_generate_refuses_what_it_cannot_honour():
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8)
    cond = DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8, num_classes=3)
    for call, needle in [
        (lambda: generate(g, 10, z=torch.randn(5, 8)), "z holds 5 latents for num_samples 10"),
        (lambda: generate(g, 10, batch_size=0), "batch_size 0 must be > 0"),
        (lambda: generate(g, 4, labels=torch.zeros(4, dtype=torch.long)), "unconditional generator"),
        (lambda: generate(cond, 4, labels=torch.zeros(2, dtype=torch.long)), "labels holds 2 classes"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            call()
    images = generate(g.to(torch.bfloat16), 4)  # z follows the generator's dtype
    assert images.dtype == torch.float32 and images.shape == (4, 1, 16, 16)


def test_a_text_file_is_not_a_torch_file(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  loss: hinge\n")
    line = fails(capsys, "generate", "--ckpt_path", str(tmp_path / "config.yaml"), "--output", str(tmp_path / "g.png"))
    assert "could not be loaded (not a torch file" in line and "pickled code" not in line


def test_an_ema_export_stays_one_when_generated_from_or_exported_again(capsys, tmp_path):
    """Re-exporting an export wrote ema false and images_seen 0; generating from it did not say EMA."""
    import json

    from safetensors import safe_open

    _, ckpt = _conditional_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    torch.save(saved | {"gangen": {"images_seen": 1234}}, ckpt)
    run("export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "a.safetensors"))
    run("export", "--ckpt_path", str(tmp_path / "a.safetensors"), "--output", str(tmp_path / "b.safetensors"))
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["ema"]) is True and json.loads(meta["images_seen"]) == 1234
        weight = f.get_tensor("net.0.weight")
    assert torch.equal(weight, saved["state_dict"]["generator_ema.net.0.weight"])
    capsys.readouterr()
    run("generate", "--ckpt_path", str(tmp_path / "b.safetensors"), "--num_samples", "2", "--output",
        str(tmp_path / "g.png"))  # fmt: skip
    assert capsys.readouterr().out.strip().endswith("(EMA generator)")
    line = fails(capsys, "generate", "--ckpt_path", str(tmp_path / "b.safetensors"), "--no_ema", "--output",
                 str(tmp_path / "h.png"))  # fmt: skip
    assert "holds the EMA generator only" in line and "gangen export --no_ema" in line


def test_a_failure_while_filling_an_existing_empty_folder_takes_the_files_out_again(monkeypatch, tmp_path):
    """Files were moved into an existing empty folder one by one: a failure (Ctrl-C, SIGTERM) part-way left
    the first ones there, and a rerun was refused ("already holds PNG files")."""
    import gangen.sampling

    (tmp_path / "pngs").mkdir()
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the 4th move fails, as an interrupt there would
        calls.append(dst)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(gangen.sampling.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        gangen.sampling.save_png_folder(torch.zeros(6, 1, 8, 8), tmp_path / "pngs")
    assert len(calls) == 4 and list((tmp_path / "pngs").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["pngs"]  # no hidden temporary folder either


def test_sigterm_handler_only_replaces_the_default():
    """Under a parent that ignores SIGTERM (nohup-like), generate used to run on; the handler took that away."""
    from gangen.commands import _terminate_as_exit

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _terminate_as_exit():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with _terminate_as_exit():
            assert callable(signal.getsignal(signal.SIGTERM))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_negative_seeds_still_draw_latents():
    assert latents(3, 4, seed=-1).shape == (3, 4) and not torch.equal(latents(3, 4, seed=-1), latents(3, 4, seed=1))

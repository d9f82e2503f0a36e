"""Metrics wired into training and the CLI: FID/KID/IS during fit, best checkpoint, cache, evaluate, DDP."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG, ROOT, run_cli, tiny_fit_args


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(*argv: str) -> None:
    """A gangen command in-process (no interpreter start-up)."""
    from gangen.cli import main

    main(list(argv))


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory, inception_weights):
    save_dir = tmp_path_factory.mktemp("fid_run")
    args = tiny_fit_args(
        save_dir, "--metrics.feature_extractor", "inception", "--metrics.inception_weights", str(inception_weights),
        "--metrics.num_samples", "16", "--metrics.num_real", "16", "--metrics.cache_dir", str(save_dir / "cache"),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "metric/fid",
        "--trainer.callbacks.filename", "best-kimg{progress/kimg:06.0f}-fid{metric/fid:.2f}",
        "--trainer.callbacks.auto_insert_metric_name", "false",
    )  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return save_dir


def test_fit_logs_fid_kid_is_and_keeps_the_best_checkpoint(fid_run, inception_weights):
    run = fid_run / "dcgan_fashion_mnist" / "version_0"
    results = read_jsonl(run / "metrics.jsonl")
    assert [r["kimg"] for r in results] == [0.64, 1.28]  # one evaluation per validation (epoch)
    for r in results:
        assert r["num_fake"] == 16 and r["num_real"] == 16 and r["weights"] == str(inception_weights)
        assert r["fid"] > 0 and np.isfinite([r["kid_mean"], r["is_mean"]]).all()
        assert r["isc_splits"] == 10 and r["kid_subset_size"] == 16 and r["latent_seed"] == 0  # the draws used
    with open(run / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("metric/fid")]
    assert [float(row["metric/fid"]) for row in rows] == pytest.approx([r["fid"] for r in results])
    # the metrics log their own kimg beside them (on CUDA the step's was up to log_every_n_steps batches behind,
    # and best-kimg{progress/kimg} names took it)
    assert [float(row["progress/kimg"]) for row in rows] == pytest.approx([r["kimg"] for r in results])
    best = min(results, key=lambda r: r["fid"])
    name = f"best-kimg{best['kimg']:06.0f}-fid{best['fid']:.2f}.ckpt"
    assert name in os.listdir(run / "checkpoints")
    assert len(list((fid_run / "cache").glob("*.pt"))) == 1  # real statistics cached once
    callbacks = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (schedule,) = [v for k, v in callbacks.items() if k.startswith("GANMetrics")]
    assert schedule["last_kimg"] == results[-1]["kimg"]  # a resumed run keeps the evaluation schedule
    assert schedule["settings"] == {"num_samples": 16, "seed": 0, "real_split": "val", "num_real": 16}


def test_evaluate_checkpoint_reuses_the_cache(fid_run, inception_weights, tmp_path):
    ckpt = fid_run / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "m.json"
    r = run_cli("evaluate", "--ckpt_path", str(ckpt), "--num_samples", "16", "--num_real", "16",
                "--inception_weights", str(inception_weights), "--cache_dir", str(fid_run / "cache"),
                "--output", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["real_from_cache"] is True and result["num_fake"] == 16 and result["num_real"] == 16
    # the same generator, latents (seed 0) and real statistics as the last evaluation during fit
    last = read_jsonl(fid_run / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl")[-1]
    assert result["fid"] == pytest.approx(last["fid"], rel=1e-4)


def test_evaluate_samples(trained_ckpt, inception_weights, tmp_path):
    npz = tmp_path / "s.npz"
    assert (
        run_cli("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "12", "--output", str(npz)).returncode
        == 0
    )
    r = run_cli("evaluate", "--samples", str(npz), "--data.dataset", "fashion_mnist", "--num_real", "12",
                "--inception_weights", str(inception_weights), "--cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "s.npz.metrics-inception-n12-real12.json").read_text())
    assert result["num_fake"] == 12 and result["feature_extractor"] == "inception" and result["fid"] > 0


def test_evaluate_names_its_default_output_after_the_input(trained_ckpt, classifier_file, tmp_path, capsys):
    """The default JSON beside the input was metrics-<extractor>-n<count>.json: a.npz then b.npz in one folder
    (or last.ckpt then epoch=...ckpt) wrote one file, and the second result silently replaced the first. The
    input's name now leads the name, with the split, seed and real count where they are not the defaults."""
    common = ["--feature_extractor", str(classifier_file), "--num_real", "12", "--cache_dir", str(tmp_path / "cache")]
    (tmp_path / "col").mkdir()
    for name, seed in (("a", "0"), ("b", "1")):
        npz = str(tmp_path / "col" / f"{name}.npz")
        run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "12", "--seed", seed, "--output", npz)
        run("evaluate", "--samples", npz, "--data.dataset", "fashion_mnist", "--data.limit", "640", *common)
    a, b = (json.loads((tmp_path / "col" / f"{n}.npz.metrics-fd_fmnist-n12-real12.json").read_text()) for n in "ab")
    assert a["source"].endswith("a.npz") and b["source"].endswith("b.npz") and a["fd_fmnist"] != b["fd_fmnist"]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path}/col/b.npz.metrics-fd_fmnist-n12-real12.json"
    (tmp_path / "ck").mkdir()
    for name in ("last.ckpt", "epoch=1-step=40.ckpt"):
        (tmp_path / "ck" / name).write_bytes(trained_ckpt.read_bytes())
        run("evaluate", "--ckpt_path", str(tmp_path / "ck" / name), "--num_samples", "12", *common)
    run("evaluate", "--ckpt_path", str(tmp_path / "ck" / "last.ckpt"), "--num_samples", "12", "--seed", "3",
        "--split", "train", *common)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.json")) == [
        "epoch=1-step=40.ckpt.metrics-fd_fmnist-n12-real12.json", "last.ckpt.metrics-fd_fmnist-n12-real12.json",
        "last.ckpt.metrics-fd_fmnist-n12-train-seed3-real12.json",
    ]  # fmt: skip


def test_evaluate_default_names_differ_by_suffix_real_count_and_folder(
    trained_ckpt, classifier_file, tmp_path, monkeypatch
):
    """The default name still joined results: last.ckpt, last.npz and last.safetensors in one folder all wrote
    last.metrics-....json, --num_real 12 and 20 one file, and `--samples .` a hidden .metrics-....json. The
    input's full name leads it, `-real<N>` a given --num_real, and a folder's own name stands for `.`."""
    common = ["--feature_extractor", str(classifier_file), "--cache_dir", str(tmp_path / "cache")]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(trained_ckpt.read_bytes())
    run("generate", "--ckpt_path", str(ck / "last.ckpt"), "--num_samples", "12", "--output", str(ck / "last.npz"))
    run("export", "--ckpt_path", str(ck / "last.ckpt"), "--output", str(ck / "last.safetensors"))
    for num_real in ("12", "20"):
        run("evaluate", "--ckpt_path", str(ck / "last.ckpt"), "--num_samples", "12", "--num_real", num_real, *common)
    run("evaluate", "--ckpt_path", str(ck / "last.safetensors"), "--num_samples", "12", "--num_real", "12", *common)
    run("evaluate", "--samples", str(ck / "last.npz"), "--data.dataset", "fashion_mnist", "--data.limit", "640",
        "--num_real", "12", *common)  # fmt: skip
    written = {p.name: json.loads(p.read_text()) for p in ck.glob("*.json")}
    assert sorted(written) == [
        "last.ckpt.metrics-fd_fmnist-n12-real12.json", "last.ckpt.metrics-fd_fmnist-n12-real20.json",
        "last.npz.metrics-fd_fmnist-n12-real12.json", "last.safetensors.metrics-fd_fmnist-n12-real12.json",
    ]  # fmt: skip
    assert [written[f"last.ckpt.metrics-fd_fmnist-n12-real{n}.json"]["num_real"] for n in (12, 20)] == [12, 20]

    run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "12", "--output", f"{tmp_path}/pngs/")
    monkeypatch.chdir(tmp_path / "pngs")
    run("evaluate", "--samples", ".", "--data.dataset", "fashion_mnist", "--data.limit", "640", *common)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["pngs.metrics-fd_fmnist-n12.json"]
    assert [p.name for p in (tmp_path / "pngs").iterdir() if not p.name.endswith(".png")] == []


def test_evaluate_a_png_folder_equals_its_npz(trained_ckpt, classifier_file, tmp_path, capsys):
    """`generate --output DIR/` then `evaluate --samples DIR/` (README's workflow): the PNGs are read in name
    order as greyscale, the array the .npz of the same seed holds, and score the same. An empty folder is one
    line naming the fix, and nothing is written."""
    from gangen.commands import load_samples

    for output in (f"{tmp_path}/pngs/", str(tmp_path / "s.npz")):
        run("generate", "--ckpt_path", str(trained_ckpt), "--num_samples", "12", "--output", output)
    folder, npz = load_samples(str(tmp_path / "pngs")), load_samples(str(tmp_path / "s.npz"))
    assert folder.shape == (12, 1, 32, 32) and torch.equal(folder, npz)
    results = []
    for source in ("pngs", "s.npz"):
        out = tmp_path / f"{source}.json"
        run("evaluate", "--samples", str(tmp_path / source), "--data.dataset", "fashion_mnist", "--data.limit", "640",
            "--feature_extractor", str(classifier_file), "--num_real", "12", "--cache_dir", str(tmp_path / "cache"),
            "--output", str(out))  # fmt: skip
        results.append(json.loads(out.read_text()))
    assert results[0]["num_fake"] == 12 and results[0]["source"] == str(tmp_path / "pngs")
    for key in ("fd_fmnist", "fd_fmnist_kid_mean"):  # equal pixels; the arrays' strides differ in the size-1
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key  # channel dim: features 1 ulp off

    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run("evaluate", "--samples", str(tmp_path / "empty"), "--data.dataset", "fashion_mnist",
            "--feature_extractor", str(classifier_file), "--output", str(tmp_path / "empty.json"))  # fmt: skip
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"gangen: error: no images in {tmp_path / 'empty'}: write some with "
                    f"`gangen generate --output {tmp_path / 'empty'}/`")  # fmt: skip
    assert not (tmp_path / "empty.json").exists() and list((tmp_path / "empty").iterdir()) == []


def test_validate_evaluates_the_checkpoint_as_evaluate_does(trained_run, classifier_file, tmp_path):
    """`validate` with metrics on evaluates (no every_kimg schedule there): metric/fd_fmnist is in the printed
    table and in metrics.jsonl at the checkpoint's kimg, equal to `evaluate` of the checkpoint with the same
    settings (samples, seed, real images)."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    r = run_cli("validate", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                "--data.limit", "640", "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples",
                "16", "--metrics.num_real", "16", "--metrics.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    [row] = read_jsonl(tmp_path / "runs" / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl")
    assert row["kimg"] == 1.28 and row["num_fake"] == 16 and row["real_from_cache"] is False
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (row["step"], row["global_step"]) == (19, saved["global_step"])  # were 0, 0: validate restores no loops
    printed = float(re.search(r"metric/fd_fmnist\W+([0-9.e+-]+)", r.stdout).group(1))  # the table: float32
    assert printed == pytest.approx(row["fd_fmnist"], rel=1e-6)
    out = tmp_path / "m.json"
    run("evaluate", "--ckpt_path", str(ckpt), "--feature_extractor", str(classifier_file), "--num_samples", "16",
        "--num_real", "16", "--cache_dir", str(tmp_path / "cache"), "--output", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["real_from_cache"] is True  # validate's real statistics: the same images
    assert result["fd_fmnist"] == pytest.approx(row["fd_fmnist"], rel=1e-9)
    assert result["fd_fmnist_kid_mean"] == pytest.approx(row["fd_fmnist_kid_mean"], rel=1e-9)


def test_bf16_true_metrics_equal_evaluate_of_the_checkpoint(classifier_file, tmp_path):
    """Under --trainer.precision bf16-true the metrics sampled the bf16 generator, `evaluate` (and `generate`)
    a float32 one from the same weights: 5e-5 apart (a metrics review). Both sample in float32 now."""
    r = run_cli(*tiny_fit_args(tmp_path, "--trainer.precision", "bf16-true", "--trainer.max_epochs", "1",
                               "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "40",
                               "--metrics.num_real", "40", "--metrics.cache_dir", str(tmp_path / "cache")))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "dcgan_fashion_mnist" / "version_0"
    [row] = read_jsonl(run_dir / "metrics.jsonl")
    out = tmp_path / "m.json"
    run("evaluate", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), "--feature_extractor",
        str(classifier_file), "--num_samples", "40", "--num_real", "40", "--cache_dir", str(tmp_path / "cache"),
        "--output", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["real_from_cache"] is True
    assert result["fd_fmnist"] == pytest.approx(row["fd_fmnist"], rel=1e-9)


RECORD = ("latent_seed", "real_split", "num_real_requested", "num_fake", "num_real", "kid_subsets",
          "kid_subset_size", "kid_is_seed", "ema")  # fmt: skip


@pytest.fixture(scope="module")
def seeded_run(classifier_file, tmp_path_factory):
    """One epoch with metrics measured at settings other than evaluate's defaults: latent seed 3, the train
    split's statistics of 16 real images, 16 generated."""
    save_dir = tmp_path_factory.mktemp("seeded_run")
    args = tiny_fit_args(
        save_dir, "--trainer.max_epochs", "1", "--model.generator.base_channels", "8",
        "--model.discriminator.base_channels", "8", "--metrics.feature_extractor", str(classifier_file),
        "--metrics.seed", "3", "--metrics.real_split", "train", "--metrics.num_samples", "16",
        "--metrics.num_real", "16", "--metrics.cache_dir", str(save_dir / "cache"),
    )  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return save_dir / "dcgan_fashion_mnist" / "version_0"


def test_rows_and_evaluate_record_what_reproduces_them(seeded_run, classifier_file, tmp_path):
    """metrics.jsonl rows and evaluate's JSON name the latent seed, the real split, the num_real asked for, the
    KID / IS draws and whether the EMA generator was measured, under the same names: a seed-3 train-split row
    looked like a seed-0 val one."""
    [row] = read_jsonl(seeded_run / "metrics.jsonl")
    assert {k: row[k] for k in RECORD} == {
        "latent_seed": 3, "real_split": "train", "num_real_requested": 16, "num_fake": 16, "num_real": 16,
        "kid_subsets": 100, "kid_subset_size": 16, "kid_is_seed": 2020, "ema": False,
    }  # fmt: skip
    assert "isc_splits" not in row  # a classifier has no logits: no IS
    out = tmp_path / "m.json"
    run("evaluate", "--ckpt_path", str(seeded_run / "checkpoints" / "last.ckpt"), "--feature_extractor",
        str(classifier_file), "--num_samples", "16", "--seed", "3", "--split", "train", "--num_real", "16",
        "--cache_dir", str(seeded_run.parent.parent / "cache"), "--output", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert {k: result[k] for k in RECORD} == {k: row[k] for k in RECORD} and result["real_from_cache"] is True


def test_validate_of_a_checkpoint_writes_the_row_fit_wrote_for_it(seeded_run, classifier_file, tmp_path):
    """validate's metrics.jsonl row of the run's last.ckpt: the kimg, step and global_step of fit's row for it
    (its step was one higher: fit evaluates before Lightning counts the batch), and the same values."""
    [fit_row] = read_jsonl(seeded_run / "metrics.jsonl")
    args = tiny_fit_args(
        tmp_path, "--trainer.max_epochs", "1", "--model.generator.base_channels", "8",
        "--model.discriminator.base_channels", "8", "--metrics.feature_extractor", str(classifier_file),
        "--metrics.seed", "3", "--metrics.real_split", "train", "--metrics.num_samples", "16",
        "--metrics.num_real", "16", "--metrics.cache_dir", str(seeded_run.parent.parent / "cache"),
    )  # fmt: skip
    r = run_cli("validate", *args[1:], "--ckpt_path", str(seeded_run / "checkpoints" / "last.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    [row] = read_jsonl(tmp_path / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl")
    assert (row["kimg"], row["step"], row["global_step"]) == (fit_row["kimg"], fit_row["step"], fit_row["global_step"])
    assert row["fd_fmnist"] == pytest.approx(fit_row["fd_fmnist"], rel=1e-6)


def test_evaluate_defaults_to_the_runs_metrics_settings(seeded_run, classifier_file, tmp_path, capsys):
    """evaluate --ckpt_path used seed 0, the val split and 10000 samples whatever the run measured with: its
    number silently differed from the rows. The checkpoint's --metrics.* settings are now its defaults, said in
    one line; an option given still wins, and the line names it."""
    [row] = read_jsonl(seeded_run / "metrics.jsonl")
    ckpt, cache = str(seeded_run / "checkpoints" / "last.ckpt"), str(seeded_run.parent.parent / "cache")
    capsys.readouterr()
    run("evaluate", "--ckpt_path", ckpt, "--feature_extractor", str(classifier_file), "--cache_dir", cache,
        "--output", str(tmp_path / "m.json"))  # fmt: skip
    settings = "--num_samples 16 --seed 3 --split train --num_real 16"
    assert f"gangen: the run's metrics settings (from the checkpoint): {settings}\n" in capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    assert {k: result[k] for k in RECORD} == {k: row[k] for k in RECORD} and result["real_from_cache"] is True
    assert result["fd_fmnist"] == pytest.approx(row["fd_fmnist"], rel=1e-9)

    run("evaluate", "--ckpt_path", ckpt, "--feature_extractor", str(classifier_file), "--cache_dir", cache,
        "--seed", "0", "--output", str(tmp_path / "seed0.json"))  # fmt: skip
    line = f"gangen: the run's metrics settings (from the checkpoint): {settings}; given instead: --seed 0\n"
    assert line in capsys.readouterr().out
    other = json.loads((tmp_path / "seed0.json").read_text())
    assert other["latent_seed"] == 0 and other["num_fake"] == 16 and other["fd_fmnist"] != result["fd_fmnist"]


def test_an_export_carries_the_runs_metrics_settings_to_evaluate(seeded_run, classifier_file, tmp_path, capsys):
    """An export recorded no --metrics.* settings: evaluate of it used 10k samples, seed 0 and the val split
    whatever the run measured with. They are in its metadata now (and a re-export keeps them)."""
    [row] = read_jsonl(seeded_run / "metrics.jsonl")
    first, second = tmp_path / "g.safetensors", tmp_path / "again.safetensors"
    run("export", "--ckpt_path", str(seeded_run / "checkpoints" / "last.ckpt"), "--output", str(first))
    run("export", "--ckpt_path", str(first), "--output", str(second))
    capsys.readouterr()
    run("evaluate", "--ckpt_path", str(second), "--feature_extractor", str(classifier_file),
        "--cache_dir", str(seeded_run.parent.parent / "cache"), "--output", str(tmp_path / "m.json"))  # fmt: skip
    settings = "--num_samples 16 --seed 3 --split train --num_real 16"
    assert f"gangen: the run's metrics settings (from the checkpoint): {settings}\n" in capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    assert {k: result[k] for k in RECORD} == {k: row[k] for k in RECORD}
    assert result["fd_fmnist"] == pytest.approx(row["fd_fmnist"], rel=1e-9)


def test_every_kimg_thins_evaluations_and_a_resume_keeps_the_schedule(classifier_file, tmp_path):
    """--metrics.every_kimg 0.5 with 0.32 kimg epochs: the first validation evaluates, 0.64 kimg is too soon
    after 0.32, 0.96 is due. A run resumed from the checkpoint of epoch 1 evaluates where the uninterrupted
    run did, with the same value: the schedule (the last evaluation's kimg) is in the checkpoint; lost at the
    resume, 0.64 would be evaluated and 0.96 skipped."""
    args = ["--data.limit", "320", "--trainer.max_epochs", "3", "--model.generator.base_channels", "8",
            "--model.discriminator.base_channels", "8", "--metrics.feature_extractor", str(classifier_file),
            "--metrics.every_kimg", "0.5", "--metrics.num_samples", "16", "--metrics.num_real", "16",
            "--metrics.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    r = run_cli(*tiny_fit_args(tmp_path / "straight", *args, "--trainer.callbacks.save_top_k", "-1"))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "straight" / "dcgan_fashion_mnist" / "version_0"
    straight = read_jsonl(folder / "metrics.jsonl")
    assert [row["kimg"] for row in straight] == [0.32, 0.96]
    first_epoch = folder / "checkpoints" / "epoch=0-step=10.ckpt"  # as a run stopped after epoch 1 left it
    r = run_cli(*tiny_fit_args(tmp_path / "resumed", *args, "--ckpt_path", str(first_epoch)))
    assert r.returncode == 0, r.stderr[-3000:]
    [resumed] = read_jsonl(tmp_path / "resumed" / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl")
    assert resumed["kimg"] == 0.96 and resumed["step"] == straight[1]["step"]
    assert resumed["fd_fmnist"] == pytest.approx(straight[1]["fd_fmnist"], rel=1e-9)  # an exact resume


def best_by_fd(mode: str) -> list[str]:
    """A best-by-metric ModelCheckpoint (as configs/dcgan_cifar10.yaml has), top 1, files named <mode>-kimg..."""
    return ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "metric/fd_fmnist",
            "--trainer.callbacks.mode", mode, "--trainer.callbacks.filename", mode + "-kimg{progress/kimg:.2f}",
            "--trainer.callbacks.auto_insert_metric_name", "false"]  # fmt: skip


def best_states(run) -> dict:
    """{mode: (best_model_score, {file name: score}, their folders)} of the best-by-FD ModelCheckpoints in the
    run's last.ckpt."""
    callbacks = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    return {
        mode: (float(v["best_model_score"]), {os.path.basename(p): float(s) for p, s in v["best_k_models"].items()},
               {os.path.dirname(p) for p in v["best_k_models"]})
        for mode in ("min", "max") for k, v in callbacks.items() if "fd_fmnist" in k and f"'mode': '{mode}'" in k
    }  # fmt: skip


def best_files(run, mode: str) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob(f"{mode}-*"))


@pytest.fixture(scope="module")
def fd_args(classifier_file, tmp_path_factory) -> list[str]:
    """Two evaluations (0.32, 0.64 kimg) with a best-by-FD ModelCheckpoint of each mode after the demo config's
    last.ckpt one: whichever way the FD moves, one of the two keeps its first value as the best."""
    cache = tmp_path_factory.mktemp("fd_cache")
    return ["--data.limit", "320", "--model.generator.base_channels", "8", "--model.discriminator.base_channels", "8",
            "--trainer.limit_val_batches", "1", "--metrics.feature_extractor", str(classifier_file),
            "--metrics.num_samples", "16", "--metrics.num_real", "16", "--metrics.cache_dir", str(cache),
            *best_by_fd("min"), *best_by_fd("max")]  # fmt: skip


def test_a_checkpoint_filename_naming_a_metric_never_logged_is_refused(classifier_file, tmp_path, capsys):
    """Following the monitor refusal's advice (monitor metric/fd_fmnist) kept the config's filename
    best-...-fid{metric/fid:.2f}, and Lightning filled the missing key with 0: best-kimg000000-fid0.00.ckpt. The
    filename is refused in one line naming the fix; that fix, given on the CLI, names the file with the FD."""
    from conftest import fails

    save_dir = tmp_path / "runs"
    args = tiny_fit_args(save_dir, "--data.limit", "320", "--trainer.max_epochs", "1", "--trainer.limit_val_batches",
                         "1", "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "16",
                         "--metrics.num_real", "16", "--metrics.cache_dir", str(tmp_path / "cache"),
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         "--trainer.callbacks.monitor", "metric/fd_fmnist",
                         "--trainer.callbacks.auto_insert_metric_name", "false")  # fmt: skip
    line = fails(capsys, *args, "--trainer.callbacks.filename", "best-kimg{progress/kimg:06.0f}-fid{metric/fid:.2f}")
    fixed = "best-kimg{progress/kimg:06.0f}-fd_fmnist{metric/fd_fmnist:.2f}"
    assert line == (
        "gangen: error: ModelCheckpoint filename 'best-kimg{progress/kimg:06.0f}-fid{metric/fid:.2f}' names "
        f"'metric/fid', which --metrics.feature_extractor {classifier_file} never logs (the file would say 0 for "
        f"it): pass --trainer.callbacks.filename '{fixed}' (it sets the last of trainer.callbacks; for another, "
        "edit the config)"
    )
    assert not save_dir.exists()
    run(*args, "--trainer.callbacks.filename", fixed)
    [row] = read_jsonl(save_dir / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl")
    [best] = (save_dir / "dcgan_fashion_mnist" / "version_0" / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-kimg000000-fd_fmnist{row['fd_fmnist']:.2f}.ckpt" and row["fd_fmnist"] > 0.005


def test_the_monitor_refusal_names_the_filename_too(classifier_file, tmp_path, capsys):
    """configs/dcgan_mnist.yaml with a classifier: the monitor refusal now gives the filename to use with the
    monitor it suggests (its filename names metric/fid as well)."""
    from conftest import fails

    line = fails(capsys, "fit", "--config", str(ROOT / "configs" / "dcgan_mnist.yaml"), "--data.root",
                 "/usr/share/datasets/fashion-mnist", "--metrics.feature_extractor", str(classifier_file),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))  # fmt: skip
    fixed = "best-kimg{progress/kimg:06.0f}-fd_fmnist{metric/fd_fmnist:.2f}"
    assert "ModelCheckpoint monitors 'metric/fid'" in line
    assert f"monitor metric/fd_fmnist with filename '{fixed}'" in line
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def fd_straight(fd_args, tmp_path_factory):
    """The run folder of 2 epochs that never stopped."""
    save_dir = tmp_path_factory.mktemp("fd_straight")
    r = run_cli(*tiny_fit_args(save_dir, *fd_args))
    assert r.returncode == 0, r.stderr[-3000:]
    return save_dir / "dcgan_fashion_mnist" / "version_0"


def test_last_ckpt_holds_the_best_by_metric_states_of_its_validation(fd_straight):
    """The config's last.ckpt ModelCheckpoint comes before the best-by-metric ones, and each saves in turn: it wrote
    their states from before the evaluation (a resume from it forgot the newest best). It now saves after them."""
    rows = read_jsonl(fd_straight / "metrics.jsonl")
    assert [row["kimg"] for row in rows] == [0.32, 0.64]
    states = best_states(fd_straight)
    for mode, better in (("min", min), ("max", max)):
        best = better(rows, key=lambda row: row["fd_fmnist"])
        assert states[mode][0] == pytest.approx(best["fd_fmnist"], rel=1e-6)
        assert list(states[mode][1]) == best_files(fd_straight, mode) == [f"{mode}-kimg{best['kimg']:.2f}.ckpt"]


def test_a_resume_into_a_new_version_keeps_the_runs_best_checkpoints(fd_args, fd_straight, tmp_path):
    """`fit --ckpt_path last` writes into version_1: each best-by-metric ModelCheckpoint continues from the
    run's best and top k as the run that never stopped does (Lightning dropped them at the changed dirpath, and
    the first evaluation after the resume became the best whatever its value). The new folder holds the run's
    best files (hard links to version_0's), and top-k pruning there never removed a file of version_0."""
    want = best_states(fd_straight)
    r = run_cli(*tiny_fit_args(tmp_path, *fd_args, "--trainer.max_epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = (tmp_path / "dcgan_fashion_mnist" / f"version_{v}" for v in (0, 1))
    before = sorted(p.name for p in (first / "checkpoints").iterdir())
    r = run_cli(*tiny_fit_args(tmp_path, *fd_args, "--ckpt_path", "last"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == before  # nothing removed in version_0
    got = best_states(second)
    for mode in ("min", "max"):
        assert got[mode][0] == pytest.approx(want[mode][0], rel=1e-9)  # an exact resume: the same values
        assert got[mode][1].keys() == want[mode][1].keys() and got[mode][2] == {str(second / "checkpoints")}
        assert best_files(second, mode) == list(got[mode][1])
        (name,) = got[mode][1]
        if name in before:  # the best came before the resume: version_1 holds it, linked
            assert os.path.samefile(first / "checkpoints" / name, second / "checkpoints" / name)
    assert "continues from the run's best" in r.stdout


def test_a_ddp_resume_whose_best_files_are_gone_keeps_their_scores(fd_args, tmp_path):
    """2 CPU processes; the user deleted version_0's best files before the resume. Their scores stay the run's
    best (a worse evaluation after the resume does not become the best), one line per file says so (rank 0's
    only), and a better evaluation is saved into version_1 as usual."""
    ddp = ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    r = run_cli(*tiny_fit_args(tmp_path, *fd_args, *ddp, "--trainer.max_epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = (tmp_path / "dcgan_fashion_mnist" / f"version_{v}" for v in (0, 1))
    gone = [first / "checkpoints" / name for mode in ("min", "max") for name in best_files(first, mode)]
    assert len(gone) == 2
    for path in gone:
        path.unlink()
    r = run_cli(*tiny_fit_args(tmp_path, *fd_args, *ddp, "--ckpt_path", "last"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("gangen: warning:")]
    assert [line.split()[2] for line in lines] == [str(path) for path in gone]  # once each, not once per rank
    (old,), (new,) = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    got = best_states(second)
    for mode, better in (("min", min), ("max", max)):
        best = better(old, new, key=lambda row: row["fd_fmnist"])
        assert got[mode][0] == pytest.approx(best["fd_fmnist"], rel=1e-6)
        assert list(got[mode][1]) == [f"{mode}-kimg{best['kimg']:.2f}.ckpt"]
        assert best_files(second, mode) == ([] if best is old else list(got[mode][1]))


def test_fit_without_weights_fails_before_training(tmp_path):
    env_home = tmp_path / "torch"
    args = tiny_fit_args(tmp_path / "runs", "--metrics.feature_extractor", "inception")
    r = run_cli(*args, env={"TORCH_HOME": str(env_home), "GANGEN_INCEPTION_WEIGHTS": None})
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("gangen: error: Inception weights not found") and "https://" in line
    assert str(env_home) in line and "--metrics.inception_weights" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["--num_samples", "8"], ["--ckpt_path", "a.ckpt", "--samples", "b.npz"]])
def test_evaluate_needs_exactly_one_source(argv):
    r = run_cli("evaluate", *argv)
    assert r.returncode == 2 and "exactly one of --ckpt_path" in r.stderr


def test_fewer_samples_than_processes_is_one_line_not_a_hang(classifier_file, tmp_path):
    """3 CPU processes sharing 2 generated images: the rank with none skipped the feature gathers the others
    waited in. Refused at setup, on every rank, before any training."""
    args = tiny_fit_args(
        tmp_path, "--trainer.devices", "3", "--trainer.accelerator", "cpu",
        "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "2",
    )  # fmt: skip
    r = run_cli(*args, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "gangen: error: metrics num_samples 2 is fewer than the 3 processes" in r.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ddp_domain_fd_counts_exactly_n_and_equals_single_process(classifier_file, tmp_path):
    """2 CPU processes (gloo): each generates its share of 15 images; the gathered FD equals one process's.

    Exactly (1e-9) only if both ranks sample the checkpoint's generator: rank 0's batchnorm statistics.
    """
    args = tiny_fit_args(
        tmp_path, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.strategy", "ddp_find_unused_parameters_true",
        "--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "15",
        "--metrics.num_real", "20", "--metrics.cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    results = read_jsonl(run / "metrics.jsonl")
    assert len(results) == 2 and all(r["num_fake"] == 15 for r in results)  # no padding duplicates
    assert all("fid" not in r and r["feature_extractor"] == "fd_fmnist" for r in results)  # never called FID
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "kimg000000.png"]  # rank 0 only
    out = tmp_path / "single.json"
    r = run_cli("evaluate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--feature_extractor",
                str(classifier_file), "--num_samples", "15", "--num_real", "20", "--cache_dir", str(tmp_path / "cache"),
                "--output", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    single = json.loads(out.read_text())
    assert single["fd_fmnist"] == pytest.approx(results[-1]["fd_fmnist"], rel=1e-9)
    assert single["fd_fmnist_kid_mean"] == pytest.approx(results[-1]["fd_fmnist_kid_mean"], rel=1e-9)
    assert re.fullmatch(r"[0-9a-f]{8}", single["weights_sha256_prefix"])

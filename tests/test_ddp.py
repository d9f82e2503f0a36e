"""Two CPU processes (gloo) through the CLI with no strategy named: DDP works out of the box for a GAN."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import ROOT, run_cli, tiny_fit_args


def test_two_process_fit_keeps_ranks_identical(tmp_path):
    probe = ["--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder", str(tmp_path)]
    # unseeded (each process has its own torch seed) and augmented: the ranks must still share one data order
    # (disjoint shards of it) and draw their own augmentations, as they draw their own latents
    unseeded = ["--seed_everything", "false", "--model.augment", "translation,cutout"]
    args = tiny_fit_args(tmp_path, "--trainer.devices", "2", "--trainer.accelerator", "cpu", *probe, *unseeded)
    r = run_cli(*args, env={"PYTHONPATH": str(ROOT / "tests")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stderr + r.stdout  # really two processes
    ranks = [torch.load(tmp_path / f"params_rank{i}.pt") for i in (0, 1)]
    assert torch.equal(ranks[0]["sampler_seed"], ranks[1]["sampler_seed"])  # one order, so disjoint shards
    assert not torch.equal(ranks[0]["augment_rng_state"], ranks[1]["augment_rng_state"])  # own augmentations
    own = ("running_", "num_batches", "images_seen", "sampler_seed", "augment_rng_state")
    params = [k for k in ranks[0] if not any(o in k for o in own)]
    assert params and all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)  # DDP kept G and D in step
    # images seen count both ranks: 2 epochs x 640 images, each rank seeing half of every epoch
    assert int(ranks[0]["images_seen"]) == int(ranks[1]["images_seen"]) == 2 * 640
    runs = list((tmp_path / "dcgan_fashion_mnist").iterdir())
    assert [p.name for p in runs] == ["version_0"]  # one run folder, written by rank 0
    run = runs[0]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "kimg000000.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=1-step=20.ckpt", "last.ckpt"]
    with open(run / "metrics.csv") as f:
        losses = [float(row["loss/g"]) for row in csv.DictReader(f) if row.get("loss/g")]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    "trainer,expected",
    [
        ({"devices": 2}, True),
        ({"devices": "2"}, True),
        ({"devices": "0,1"}, True),
        ({"devices": [0]}, False),
        ({"devices": 1, "num_nodes": 2}, True),
        ({"devices": 1}, False),
        ({"devices": "auto", "accelerator": "cpu"}, False),
    ],
)
def test_multi_process_detection(trainer, expected):
    from gangen.cli import _multi_process

    assert _multi_process(trainer) is expected

"""Two CPU processes (gloo) through the CLI with no strategy named: DDP works out of the box for a GAN."""

from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
from conftest import ROOT, run_cli, tiny_fit_args


def test_two_process_fit_keeps_ranks_identical(tmp_path):
    probe = ["--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder", str(tmp_path),
             "--trainer.callbacks.record", "true"]  # fmt: skip
    # unseeded (each process has its own torch seed) and augmented: the ranks must still share one data order
    # (disjoint shards of it) and draw their own augmentations, as they draw their own latents
    unseeded = ["--seed_everything", "false", "--model.augment", "translation,cutout"]
    args = tiny_fit_args(tmp_path, "--trainer.devices", "2", "--trainer.accelerator", "cpu", *probe, *unseeded)
    r = run_cli(*args, env={"PYTHONPATH": str(ROOT / "tests")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stderr + r.stdout  # really two processes
    ranks = [torch.load(tmp_path / f"params_rank{i}.pt") for i in (0, 1)]
    assert torch.equal(ranks[0]["sampler_seed"], ranks[1]["sampler_seed"])  # one order, so disjoint shards
    # what each rank trained on (the DataLoader path on CPU): every epoch, two disjoint halves of all 640 images
    trained = [torch.load(tmp_path / f"trained_rank{i}.pt") for i in (0, 1)]
    assert [t["epochs"].tolist() for t in trained] == [[0] * 5 + [1] * 5] * 2  # 5 batches of 64 per rank and epoch
    epochs = []
    for epoch in (0, 1):
        shards = [t["images"][t["epochs"] == epoch].flatten().tolist() for t in trained]
        assert [len(set(s)) for s in shards] == [320, 320]  # no image twice on a rank
        assert not set(shards[0]) & set(shards[1])  # nor on both ranks
        epochs.append(set(shards[0]) | set(shards[1]))
    assert epochs[0] == epochs[1] and len(epochs[0]) == 640  # the whole set every epoch
    # each rank its own latents (else both train on the same fakes): rank r draws its z from model.seed (0) + r
    same = [torch.equal(a, b) for a, b in zip(*(t["latents"] for t in trained), strict=True)]
    assert len(same) == 10 and not any(same), same
    for rank, t in enumerate(trained):
        stream = torch.Generator().manual_seed(rank)
        assert torch.equal(t["latents"], torch.stack([torch.randn(64, 100, generator=stream) for _ in range(10)]))
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


@pytest.mark.parametrize("hflip", [False, True])
def test_sampler_shards_are_equal_disjoint_slices_of_one_order(hflip):
    """ResumableRandomSampler under DDP (3 ranks): equally long, pairwise disjoint shards that together are the
    epoch's one order (100 items: 33 each, the last item left out), and a resumed rank skips its own items only."""
    from gangen.reliability import ResumableRandomSampler

    def shards(epoch: int, resume: int | None = None) -> list[list]:
        out = []
        for rank in range(3):
            sampler = ResumableRandomSampler(100, seed=7, rank=rank, world_size=3, hflip=hflip)
            sampler.set_epoch(epoch)
            if resume is not None:
                sampler.resume_at(epoch, resume)
            out.append(list(sampler))
            assert len(sampler) == 33
        return out

    whole = shards(4)
    assert [len(s) for s in whole] == [33, 33, 33]
    indices = [[item[0] if hflip else item for item in s] for s in whole]
    assert all(not set(a) & set(b) for a, b in itertools.combinations(indices, 2))
    one = ResumableRandomSampler(100, seed=7, hflip=hflip)  # one process: the whole order of the epoch
    one.set_epoch(4)
    assert sum(whole, []) == list(one)[:99]
    assert shards(4, resume=10) == [s[10:] for s in whole]  # each rank 10 of its own items in
    assert shards(5) != whole  # another epoch, another order


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

"""Exact resume and preemption, with real signals: SIGKILL mid-epoch then `fit --ckpt_path last` ends with
the same weights as a run that never stopped; SIGTERM / SIGINT write a checkpoint before the process exits."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, tiny_fit_args

PROBE_ENV = {"PYTHONPATH": str(ROOT / "tests")}
STEPS_PER_BATCH = 2  # global_step counts both optimizers' steps


def fit(save_dir: Path, *extra: str) -> object:
    """A 2-epoch tiny fit (2 x 6 batches of 64) that dumps its final parameters into save_dir/params_rank0.pt."""
    dump = ["--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder", str(save_dir)]
    args = tiny_fit_args(save_dir, "--data.limit", "384", "--trainer.limit_val_batches", "1", *dump, *extra)
    return run_cli(*args, env=PROBE_ENV)


def step_checkpoints(every_batches: int) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps", str(every_batches * STEPS_PER_BATCH),
            "--trainer.callbacks.save_last", "true", "--trainer.callbacks.filename", "step{step}"]  # fmt: skip


def signal_at(batch: int, signum: int) -> list[str]:
    return ["--trainer.callbacks+=fault_probe.SignalAt", "--trainer.callbacks.step", str(batch * STEPS_PER_BATCH),
            "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, differ


def assert_same_ranks(want_dir: Path, got_dir: Path, images: int) -> None:
    """Bitwise: every weight on both ranks of a 2-process run, and all of rank 0's state (batchnorm running
    statistics are per rank, and a checkpoint holds rank 0's only)."""
    for rank in (0, 1):
        want, got = torch.load(want_dir / f"params_rank{rank}.pt"), torch.load(got_dir / f"params_rank{rank}.pt")
        assert int(got["images_seen"]) == images
        if rank > 0:
            own = ("running_", "num_batches_tracked")
            want, got = ({k: v for k, v in d.items() if not any(o in k for o in own)} for d in (want, got))
        assert_same_state(want, got)


# Every piece of state that changes the trajectory: EMA generator, DiffAugment's random stream, the lazy R1
# schedule (batches seen), the DataLoader's flips, D's dropout (torch's global stream).
FULL_STATE = ["--model.ema_kimg", "0.5", "--model.augment", "color,translation,cutout",
              "--model.reg", "r1", "--model.reg_every", "4", "--data.hflip", "true",
              "--model.discriminator.dropout", "0.3"]  # fmt: skip
VARIANTS = {
    "dcgan": [],
    "ema_augment_r1": FULL_STATE,
    "on_device": ["--data.on_device", "true"],  # batches built without a DataLoader (gangen/batches.py)
}


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> dict:
    return {}


@pytest.fixture(params=["dcgan"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def uninterrupted(straight_runs, variant, tmp_path_factory) -> dict:
    """Final parameters of the uninterrupted fit of this variant (trained once per module)."""
    if variant not in straight_runs:
        save_dir = tmp_path_factory.mktemp(f"straight_{variant}")
        r = fit(save_dir, "--ckpt_path", "last", *VARIANTS[variant])  # nothing saved yet: "set and forget"
        assert r.returncode == 0, r.stderr[-3000:]
        assert "no last.ckpt under" in r.stdout and "training from scratch" in r.stdout
        straight_runs[variant] = torch.load(save_dir / "params_rank0.pt")
    return straight_runs[variant]


@pytest.mark.parametrize("variant", list(VARIANTS), indirect=True)
def test_sigkill_mid_epoch_then_resume_last_is_exact(uninterrupted, variant, tmp_path):
    extra = VARIANTS[variant]
    # killed at the start of batch 10 (epoch 2, 3 batches in), after the step checkpoint of batch 9
    r = fit(tmp_path, *step_checkpoints(9), *signal_at(9, signal.SIGKILL), *extra)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (tmp_path / "params_rank0.pt").exists()  # it really died before the end
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last-v1.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 18 and ckpt["gangen"]["batches_seen"] == 9
    assert ckpt["ImageDataModule"]["position"] == 3 * 64  # 3 batches into epoch 1
    r = fit(tmp_path, "--ckpt_path", "last", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {last}" in r.stdout
    resumed = torch.load(tmp_path / "params_rank0.pt")
    assert int(resumed["images_seen"]) == 2 * 384
    assert any(k.startswith("generator_ema.") for k in resumed) == ("--model.ema_kimg" in extra)
    assert_same_state(uninterrupted, resumed)  # bitwise: G, D, EMA, batchnorm statistics, grid latents


def test_sigkill_after_mid_epoch_validation_save_resumes_exactly(tmp_path):
    """With validation every 2 batches ModelCheckpoint saves last.ckpt in fit's validation, mid-epoch: killed
    after the one at batch 8 (epoch 1, 2 batches in), the resumed run ends as the run that never stopped."""
    every_2 = ["--trainer.val_check_interval", "2", "--model.discriminator.dropout", "0.3"]  # validation loaders
    r = fit(tmp_path / "straight", *every_2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = fit(tmp_path, *signal_at(9, signal.SIGKILL), *every_2)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    order = {"seed": 0, "epoch": 1, "world_size": 1, "order": 2}
    assert ckpt["gangen"]["batches_seen"] == 8 and ckpt["ImageDataModule"] == dict(order, position=128)
    r = fit(tmp_path, "--ckpt_path", "last", *every_2)
    assert r.returncode == 0, r.stderr[-3000:]
    straight, resumed = (torch.load(d / "params_rank0.pt") for d in (tmp_path / "straight", tmp_path))
    assert int(resumed["images_seen"]) == 2 * 384
    assert_same_state(straight, resumed)


def test_max_steps_stop_after_a_mid_epoch_validation_resumes_exactly(tmp_path):
    """ModelCheckpoint saved at the validation (batch 8); max_steps then stopped the run at batch 9, 3 batches
    into epoch 1, and Preemption wrote last.ckpt at the end of training: after Lightning had counted the cut
    epoch done, so the resumed run skipped the rest of it (a metrics review: other kimg for every later
    evaluation, and no final one)."""
    every_2 = ["--trainer.val_check_interval", "2"]
    r = fit(tmp_path / "straight", *every_2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = fit(tmp_path, *every_2, "--trainer.max_steps", str(9 * STEPS_PER_BATCH))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 9
    assert ckpt["ImageDataModule"] == {"seed": 0, "epoch": 1, "position": 3 * 64, "world_size": 1, "order": 2}
    r = fit(tmp_path, "--ckpt_path", "last", *every_2)
    assert r.returncode == 0, r.stderr[-3000:]
    straight, resumed = (torch.load(d / "params_rank0.pt") for d in (tmp_path / "straight", tmp_path))
    assert int(resumed["images_seen"]) == 2 * 384
    assert_same_state(straight, resumed)


def test_sigterm_saves_checkpoint_and_resumes_exactly(uninterrupted, tmp_path):
    r = fit(tmp_path, *signal_at(8, signal.SIGTERM))
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM received: saved {last}" in r.stdout
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 9  # the batch running when the signal came was finished
    assert not (tmp_path / "params_rank0.pt").exists()
    stray = tmp_path / "cwd" / "checkpoints" / "last.ckpt"  # newer, in default_root_dir: not the run's folder
    stray.parent.mkdir(parents=True)
    stray.write_bytes(last.read_bytes())
    r = fit(tmp_path, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "cwd"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {last}\n" in r.stdout
    assert_same_state(uninterrupted, torch.load(tmp_path / "params_rank0.pt"))


def test_sigterm_in_an_epochs_last_batch_resumes_with_the_whole_next_epoch(uninterrupted, tmp_path):
    """Stopped in epoch 0's last batch (no validation that epoch), Lightning has counted the epoch as done:
    the checkpoint's epoch is 1 while the batch counts are still epoch 0's, so its position was a whole
    epoch and the resumed run skipped all of epoch 1."""
    every_2 = ["--trainer.check_val_every_n_epoch", "2"]
    r = fit(tmp_path, *signal_at(5, signal.SIGTERM), *every_2)  # batch 5: the last of epoch 0's 6
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    ckpt = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    order = {"seed": 0, "epoch": 1, "world_size": 1, "order": 2}
    assert ckpt["gangen"]["batches_seen"] == 6 and ckpt["ImageDataModule"] == dict(order, position=0)
    r = fit(tmp_path, "--ckpt_path", "last", *every_2)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(tmp_path / "params_rank0.pt")
    assert int(resumed["images_seen"]) == 2 * 384
    assert_same_state(uninterrupted, resumed)


def test_last_checkpoint_holds_the_epochs_after_the_last_validation(tmp_path):
    """ModelCheckpoint saves after validation when it runs every 2 epochs: a 3-epoch fit's last.ckpt held
    epoch 1 (Lightning saves at the end only when it never saved), and the third epoch was lost."""
    r = fit(tmp_path, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["images_seen"] == 3 * 384 and ckpt["global_step"] == 3 * 6 * STEPS_PER_BATCH
    final = torch.load(tmp_path / "params_rank0.pt")
    assert torch.equal(ckpt["state_dict"]["generator.net.0.weight"], final["generator.net.0.weight"])


def test_max_steps_stop_then_resume_last_is_exact(uninterrupted, tmp_path):
    """A run stopped by max_steps 4 batches into epoch 0 (of 6), then resumed from the last.ckpt that
    ModelCheckpoint wrote at that stop: it finishes epoch 0 first and ends as the run that never stopped."""
    r = fit(tmp_path, "--trainer.max_steps", str(4 * STEPS_PER_BATCH))
    assert r.returncode == 0, r.stderr[-3000:]
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 4 and ckpt["ImageDataModule"]["position"] == 4 * 64
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0  # epoch 0 not done
    r = fit(tmp_path, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(tmp_path / "params_rank0.pt")
    assert int(resumed["images_seen"]) == 2 * 384  # Lightning alone skips the 2 batches left in epoch 0
    assert_same_state(uninterrupted, resumed)


def test_a_run_with_another_seed_everything_resumes_with_a_plain_ckpt_path_last(tmp_path):
    """The DataLoader's order came from --seed_everything while the resume check compared it with --data.seed:
    `fit ... --ckpt_path last` of any run with a seed_everything other than 0 was refused ("resume with
    --data.seed 5", an option the run never set). The order now comes from --data.seed on both data paths."""
    r = fit(tmp_path, "--seed_everything", "5", "--trainer.max_epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["ImageDataModule"]
    assert (state["seed"], state["order"]) == (0, 2)  # --data.seed's default, not --seed_everything
    r = fit(tmp_path, "--seed_everything", "5", "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {last}" in r.stdout


def test_sigint_saves_checkpoint(tmp_path):
    r = fit(tmp_path, *signal_at(2, signal.SIGINT))
    assert r.returncode == 128 + signal.SIGINT, (r.returncode, r.stderr[-3000:])
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"SIGINT received: saved {last}" in r.stdout
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 3
    assert not (tmp_path / "params_rank0.pt").exists()


def test_second_sigint_stops_at_once_without_a_checkpoint(tmp_path):
    """Ctrl-C twice: the first asks for a checkpoint at the next batch start; the second, before then, stops
    training at once (a KeyboardInterrupt, after which Lightning exits 1; gangen makes it the shell's 130) and
    writes nothing."""
    r = fit(tmp_path, *signal_at(2, signal.SIGINT), *signal_at(3, signal.SIGINT))  # batch 3: before the save
    assert r.returncode == 128 + signal.SIGINT, (r.returncode, r.stderr[-3000:])
    assert "Detected KeyboardInterrupt" in r.stdout and "SIGINT received" not in r.stdout + r.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "params_rank0.pt").exists()


@pytest.mark.parametrize("probe", ["SignalWhenBuilt", "SignalAtSetup"])
def test_ctrl_c_before_training_exits_130_without_a_traceback_or_checkpoint(tmp_path, probe):
    """Ctrl-C while the CLI builds the model, data and callbacks was a KeyboardInterrupt traceback; in
    Lightning's setup (before the sanity check and gangen's handlers) it was Lightning's exit status 1."""
    r = fit(tmp_path, f"--trainer.callbacks+=fault_probe.{probe}")
    assert r.returncode == 128 + signal.SIGINT, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and not list(tmp_path.rglob("*.ckpt"))
    if probe == "SignalWhenBuilt":
        assert r.stderr.strip().splitlines()[-1] == "gangen: interrupted" and not list(tmp_path.iterdir())
    else:
        assert "Detected KeyboardInterrupt" in r.stdout


@pytest.mark.parametrize("loader", ["dataloader", "on_device"])
def test_two_process_mid_epoch_resume_is_exact(loader, tmp_path):
    """DDP (2 CPU processes, gloo): stopped mid-epoch 1, then resumed from its step checkpoint; every
    rank ends with the same weights as a run that never stopped (each rank skips its own consumed batches)."""
    ddp = [
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--data.on_device",
        str(loader == "on_device"),
        "--model.augment",
        "translation,cutout",
        "--data.hflip",
        "true",
        "--model.discriminator.dropout",
        "0.3",
    ]  # per-rank streams resume too
    straight = tmp_path / "straight"
    r = fit(straight, *ddp)  # 384 images: 3 batches of 64 per rank and epoch, 2 epochs
    assert r.returncode == 0, r.stderr[-3000:]
    stopped = tmp_path / "stopped"
    r = fit(stopped, *ddp, *step_checkpoints(4), "--trainer.max_steps", str(4 * STEPS_PER_BATCH))
    assert r.returncode == 0, r.stderr[-3000:]
    # the step checkpoint, the one a killed job leaves
    step_ckpt = stopped / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / f"stepstep={4 * STEPS_PER_BATCH}.ckpt"
    ckpt = torch.load(step_ckpt, weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 4 and ckpt["ImageDataModule"]["position"] == 64  # 1 batch into epoch 1
    if loader == "dataloader":  # on one process its shard is not the two ranks' shards: refused, nothing written
        r = fit(tmp_path / "one", *ddp[2:], "--ckpt_path", str(step_ckpt))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"gangen: error: checkpoint {step_ckpt} was taken 64 images into epoch 1 on each of 2 processes, this run "
            "has 1: resume it with 2 (--trainer.devices x --trainer.num_nodes), or from a checkpoint taken at an "
            "epoch end"
        ], r.stderr[-3000:]
        assert not (tmp_path / "one").exists()
    r = fit(stopped, *ddp, "--ckpt_path", str(step_ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_ranks(straight, stopped, images=2 * 384)


def test_a_torchrun_restart_after_a_killed_worker_resumes_exactly(tmp_path):
    """The README's torchrun line (`--max-restarts`, `--ckpt_path last`, the c10d rendezvous with its store not
    shared): a worker killed mid-epoch (rank 1, SIGKILL, first attempt only) makes torchrun stop the other and
    start both again with the same command, which resumes from the last epoch's last.ckpt; every rank ends with
    the weights of a run that never stopped. With the store shared (torch's default) a restart whose rank 0 comes
    late fails to connect (gangen.distributed.torchrun_restart_warning)."""
    import subprocess
    import sys

    ddp = ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    straight = tmp_path / "straight"
    r = fit(straight, *ddp)  # 384 images: 3 batches of 64 per rank and epoch, 2 epochs; Lightning starts rank 1
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tmp_path / "torchrun"
    dump = ["--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder", str(runs)]
    kill = [*signal_at(4, signal.SIGKILL), "--trainer.callbacks.rank", "1", "--trainer.callbacks.attempt", "0"]
    args = tiny_fit_args(runs, "--data.limit", "384", "--trainer.limit_val_batches", "1", *dump, *ddp, *kill)
    env = {**os.environ, **PROBE_ENV, "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("GANGEN_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
         str(ROOT / "cli.py"), *args, "--ckpt_path", "last"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-5000:]
    assert "training from scratch" in r.stdout and "resuming from" in r.stdout, r.stdout[-3000:]
    assert "gangen: warning: torchrun" not in r.stderr  # the store is not shared: nothing to warn of
    resumed = runs / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"gangen: resuming from {resumed}" in r.stdout, r.stdout[-3000:]
    assert_same_ranks(straight, runs, images=2 * 384)


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """One node of a multi-node job preempted: SIGTERM reached rank 1 only. Lightning's handler broadcast
    inside the signal handler, against rank 0's gradient all-reduce, and the job hung without a checkpoint."""
    ddp = ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    r = fit(tmp_path, *ddp, *signal_at(4, signal.SIGTERM), "--trainer.callbacks.rank", "1")
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM received: saved {last}" in r.stdout
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 5  # batch 4, of the signal, finished
    assert not (tmp_path / "params_rank0.pt").exists()


def test_sigterm_during_validation_lets_it_finish_then_stops_after_the_next_batch(tmp_path):
    """Lightning stopped between validation batches and the checkpoint, taken mid-validation, resumed as if
    that validation had run: its logged values (and metric evaluation) were lost."""
    probe = ["--trainer.callbacks+=fault_probe.SignalInValidation", "--trainer.limit_val_batches", "2"]
    r = fit(tmp_path, *probe)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 7  # epoch 0's 6 batches, its validation, then one more batch
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, row.split(","), strict=False)) for row in rows[1:]]
    assert any(row.get("val/loss_d") for row in logged)  # the validation's values were logged


def test_sigterm_in_the_batch_before_validation_lets_it_run_whole_and_resumes_exactly(uninterrupted, tmp_path):
    """Agreed at the end of epoch 0's last batch, the stop set Lightning's flag and its validation loop raised
    after the first of its batches: those values were lost. It now comes at the next batch start."""
    r = fit(tmp_path, *signal_at(5, signal.SIGTERM), "--trainer.limit_val_batches", "2")
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gangen"]["batches_seen"] == 6 and ckpt["ImageDataModule"]["position"] == 0  # epoch 1 from the start
    rows = (run / "metrics.csv").read_text().splitlines()
    logged = [dict(zip(rows[0].split(","), row.split(","), strict=False)) for row in rows[1:]]
    assert [row["epoch"] for row in logged if row.get("val/loss_d")] == ["0"]  # epoch 0's validation, whole
    r = fit(tmp_path, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_state(uninterrupted, torch.load(tmp_path / "params_rank0.pt"))


def logged_steps(run: Path) -> list[tuple[int, int]]:
    """(step, epoch) of the training rows of a run folder's metrics.csv (none before the first row)."""
    if not (run / "metrics.csv").exists():
        return []
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, row.split(","), strict=False)) for row in rows[1:]]
    return [(int(row["step"]), int(row["epoch"])) for row in logged if row.get("loss/d")]


@pytest.mark.parametrize("batch", [3, 5], ids=["mid_epoch", "last_batch"])
def test_a_run_resumed_after_sigterm_logs_at_the_uninterrupted_runs_steps(tmp_path, batch):
    """The stop's checkpoint is written at the next batch start, after Lightning counted the batch in the
    loggers' step; a restart added it again: every later row was one step too high, and other batches were
    logged (a resume review). Rows every 5 batches: 4, 9 (epoch 1) in both runs."""
    straight = fit(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    r = fit(tmp_path, *signal_at(batch, signal.SIGTERM))
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    r = fit(tmp_path, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    want = logged_steps(tmp_path / "straight" / "dcgan_fashion_mnist" / "version_0")
    before, after = (logged_steps(tmp_path / "dcgan_fashion_mnist" / f"version_{v}") for v in (0, 1))
    assert want == [(4, 0), (9, 1)] and before + after == want, (before, after)
    final = torch.load(tmp_path / "dcgan_fashion_mnist" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == 12  # 12 batches trained


@pytest.mark.parametrize("version, folder", [("0", "version_0"), ("fixed", "fixed")])
def test_a_resume_and_a_validate_into_the_same_csv_folder_keep_the_earlier_rows(tmp_path, version, folder):
    """With a fixed logger version (one folder across resumes) Lightning's CSV logger deleted the earlier
    segments' metrics.csv when it started, with only a warning (a resume review). It is kept as metrics.1.csv,
    as config.yaml is kept as config.1.yaml; a validate into the folder keeps the training rows the same way. A
    string version names the folder as given (no version_ prefix): `last` never looked there and trained from
    scratch in the run's own folder (a review of the resume fixes)."""
    same = ["--trainer.logger.init_args.version", version]
    r = fit(tmp_path, *same, "--trainer.max_epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "dcgan_fashion_mnist" / folder
    first = (run / "metrics.csv").read_text()
    r = fit(tmp_path, *same, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {run / 'checkpoints' / 'last.ckpt'}" in r.stdout
    assert (run / "metrics.1.csv").read_text() == first
    assert logged_steps(run) == [(9, 1)] and "will be deleted" not in r.stderr
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.1.yaml", "config.yaml"]
    trained = (run / "metrics.csv").read_text()
    args = tiny_fit_args(tmp_path, "--data.limit", "384", "--trainer.limit_val_batches", "1", *same)
    r = run_cli("validate", *args[1:], "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "metrics.2.csv").read_text() == trained and (run / "metrics.1.csv").read_text() == first
    assert "val/loss_d" in (run / "metrics.csv").read_text()  # validate's own row


def test_a_kill_after_an_evaluation_leaves_one_metrics_row_per_kimg(tmp_path, classifier_file):
    """Killed after epoch 1's evaluation wrote its row but before the checkpoint of it, the run resumed into the
    same folder (a fixed version) from the epoch-0 checkpoint evaluated kimg 0.768 again and appended a second
    row for it. Rows past the checkpoint are dropped at the resume; the re-evaluation equals the first."""
    same = ["--trainer.logger.init_args.version", "0", "--trainer.max_epochs", "3"]
    metrics = ["--metrics.feature_extractor", str(classifier_file), "--metrics.num_samples", "16",
               "--metrics.num_real", "16", "--metrics.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    kill = ["--trainer.callbacks+=fault_probe.KillAfterValidation", "--trainer.callbacks.n", "2"]
    r = fit(tmp_path, *same, *metrics, *kill)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    jsonl = tmp_path / "dcgan_fashion_mnist" / "version_0" / "metrics.jsonl"
    killed = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["kimg"] for row in killed] == [0.384, 0.768]
    with open(jsonl, "a") as f:
        f.write('{"kimg": 0.9')  # a row cut short by the kill
    r = fit(tmp_path, *same, *metrics, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: 2 row(s) of {jsonl} written after the checkpoint were dropped" in r.stdout
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["kimg"] for row in rows] == [0.384, 0.768, 1.152]
    assert rows[1]["fd_fmnist"] == killed[1]["fd_fmnist"]  # the exact resume re-evaluates the same value


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path):
    """Lightning restores the epoch's progress in batches, the checkpoint's position is in images: a larger batch
    ended the epoch early (96 of 256 images never trained), a smaller one left the next checkpoint's position
    wrong (48 images trained twice on a later resume), and the two data paths disagreed (a resume review)."""
    r = fit(tmp_path, *signal_at(2, signal.SIGTERM))
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    r = fit(tmp_path, "--ckpt_path", "last", "--data.batch_size", "32")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"gangen: error: checkpoint {last} was taken 192 images into epoch 0 with --data.batch_size 64, this run "
        "has 32: a mid-epoch resume with another batch size skips or repeats images; resume with "
        "--data.batch_size 64 (change it from a checkpoint taken at an epoch end)"
    ], r.stderr[-3000:]
    assert sorted(p.name for p in last.parent.parent.parent.iterdir()) == ["version_0"]  # no new run folder


@pytest.mark.parametrize("worlds", [(1, 2), (2, 1)], ids=["1_to_2", "2_to_1"])
def test_an_epoch_end_checkpoint_resumes_on_another_number_of_processes(tmp_path, worlds):
    """The epoch-end last.ckpt (ModelCheckpoint in on_train_epoch_end) recorded the finished epoch as 'position =
    the whole shard', and the world-size check refused it on another process count, whose message suggested
    an epoch-end checkpoint (a resume review). It now records the next epoch's start."""

    def devices(n: int) -> list[str]:
        return ["--trainer.devices", str(n), "--trainer.accelerator", "cpu"]

    first, second = worlds
    r = fit(tmp_path, *devices(first), "--trainer.max_epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["ImageDataModule"] == {"seed": 0, "epoch": 1, "position": 0, "world_size": first, "order": 2}
    r = fit(tmp_path, *devices(second), "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {last}" in r.stdout
    resumed = tmp_path / "dcgan_fashion_mnist" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["gangen"]["images_seen"] == 2 * 384  # epoch 1 trained whole


def test_sigterm_on_one_rank_in_the_sanity_check_stops_both_after_the_first_batch(tmp_path):
    """Before training started Lightning's handler was still in place: it broadcast inside the signal handler
    and the two ranks crashed on a collective mismatch (or hung)."""
    ddp = ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.num_sanity_val_steps", "2"]
    probe = ["--trainer.callbacks+=fault_probe.SignalInValidation", "--trainer.callbacks.sanity", "true",
             "--trainer.callbacks.rank", "1", "--trainer.limit_val_batches", "2"]  # fmt: skip
    r = fit(tmp_path, *ddp, *probe)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    last = tmp_path / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["gangen"]["batches_seen"] == 1


def test_latent_rng_state_restores_from_a_row_view():
    """A checkpoint's per-rank RNG states can be row views of one gathered (world, S) tensor (files written
    before the fix are); Generator.set_state misread those, so rank 1 could not resume."""
    from gangen.networks import DCGANDiscriminator, DCGANGenerator
    from gangen.system import GAN

    gathered = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (5, 6)])  # (2, S)
    model = GAN(DCGANGenerator(latent_dim=8, resolution=16, channels=1, base_channels=8),
                DCGANDiscriminator(resolution=16, channels=1, base_channels=8))  # fmt: skip
    view = gathered[1]  # what rank 1 reads: a view at storage offset S
    assert view.storage_offset() > 0
    model.on_load_checkpoint({"gangen": {"latent_rng_device": "cpu", "latent_rng_states": [view, gathered[0]]}})
    want = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(model.sample_latents(4), want)


def test_a_stray_hpc_checkpoint_is_not_resumed_outside_slurm(tmp_path, trained_ckpt):
    """Lightning's hpc_ckpt_*.ckpt lie in default_root_dir (the working directory by default): outside SLURM one
    there is another job's, and a fresh run's `--ckpt_path last` continued it (a review of the resume fixes)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "hpc_ckpt_1.ckpt").write_bytes(trained_ckpt.read_bytes())  # the same config's run, 2 epochs done
    slurm = {key: None for key in os.environ if key.startswith("SLURM_")}
    r = run_cli(
        *tiny_fit_args(tmp_path / "runs", "--trainer.max_epochs", "1"), "--ckpt_path", "last", cwd=work, env=slurm
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training from scratch" in r.stdout and "hpc_ckpt" not in r.stdout, r.stdout[-2000:]
    ckpt = torch.load(tmp_path / "runs" / "dcgan_fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["gangen"]["batches_seen"] == 10  # one epoch of 10 batches, from zero


def test_the_stops_last_ckpt_goes_where_the_epochs_last_ckpt_go(tmp_path):
    """The ModelCheckpoints writing last.ckpt run after the others now (save_last_after_top_k), and the stop's
    last.ckpt went to the first ModelCheckpoint's folder: a best-by-metric one's, when the two have their own."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gangen.reliability import Preemption, save_last_after_top_k

    last = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="metric/fid", filename="best")
    trainer = L.Trainer(callbacks=[last, best], logger=False, default_root_dir=tmp_path, accelerator="cpu")
    save_last_after_top_k(trainer)
    assert trainer.checkpoint_callbacks == [best, last]
    assert Preemption.checkpoint_path(trainer) == tmp_path / "last" / "last.ckpt"
    trainer = L.Trainer(callbacks=[best], logger=False, default_root_dir=tmp_path, accelerator="cpu")
    assert Preemption.checkpoint_path(trainer) == tmp_path / "best" / "last.ckpt"  # none writes one: the first

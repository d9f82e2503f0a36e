"""Multi-node through Lightning's own launcher (2 nodes x 1 process on localhost) and bad device settings."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import DEMO_CONFIG, ROOT, assert_fit_refused, run_cli, tiny_fit_args
from jsonargparse import Namespace
from lightning.pytorch.plugins.environments import SLURMEnvironment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(
    args: list[str], env: dict[str, str], per_rank: Callable[[int], dict[str, str]], timeout: float = 400
) -> list[tuple[int, str, str]]:
    """`python cli.py ARGS` twice at once, as a launcher starts one process per node or task: the environment
    plus `env` plus per_rank(0 or 1), one rendezvous address. [(returncode, stdout, stderr)] in rank order."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "tests"), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), **env}  # fmt: skip
    for key in ("GANGEN_DEBUG", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"):
        base.pop(key, None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *args],
            cwd=ROOT,
            text=True,
            env={**base, **per_rank(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs, strict=True)]


def test_two_nodes_one_process_each(tmp_path):
    """What `srun` / a launcher does per node: the same command, NODE_RANK 0 and 1, one rendezvous address."""
    probe = ["--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder", str(tmp_path)]
    args = tiny_fit_args(tmp_path, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator",
                         "cpu", *probe)  # fmt: skip
    outputs = launch_two(args, {}, lambda rank: {"NODE_RANK": str(rank)})
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    assert "MEMBER: 1/2" in outputs[0][2] + outputs[0][1] and "MEMBER: 2/2" in outputs[1][2] + outputs[1][1]
    # the global batch, stated once (rank 0): 64 per device x 1 device x 2 nodes
    assert "gangen: global batch 128 = 64 per device x 1 device x 2 nodes" in outputs[0][1]
    assert "global batch" not in outputs[1][1] + outputs[1][2]
    ranks = [torch.load(tmp_path / f"params_rank{i}.pt") for i in (0, 1)]
    params = [k for k in ranks[0] if "running_" not in k and "num_batches" not in k and k != "images_seen"]
    assert params and all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    assert int(ranks[0]["images_seen"]) == int(ranks[1]["images_seen"]) == 2 * 640
    [run] = list((tmp_path / "dcgan_fashion_mnist").iterdir())  # one run folder for both nodes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=1-step=20.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "kimg000000.png"]


def test_a_process_killed_mid_run_leaves_the_other_one_line_not_a_page_of_frames(tmp_path):
    """Rank 1 killed (out of memory, a kill -9) in epoch 1: rank 0's next collective fails in gloo, which
    printed some 60 lines of torch's frames ending in "Connection closed by peer". Now one line that says what
    happened and how to go on; the exit status stays 1 and epoch 0's last.ckpt is there to resume from."""
    kill = ["--trainer.callbacks+=fault_probe.SignalAt", "--trainer.callbacks.step", "14",  # epoch 1, batch 2
            "--trainer.callbacks.signum", str(int(signal.SIGKILL)), "--trainer.callbacks.rank", "1"]  # fmt: skip
    args = tiny_fit_args(tmp_path, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator",
                         "cpu", *kill)  # fmt: skip
    (code0, _, err0), (code1, _, _) = launch_two(args, {}, lambda rank: {"NODE_RANK": str(rank)})
    assert code1 == -signal.SIGKILL and code0 == 1, err0[-3000:]
    said = [line for line in err0.splitlines() if line.startswith("gangen:") or "Error" in line]
    assert len(said) == 1 and re.fullmatch(
        r"gangen: error: process 0 of 2 lost another process of the run \(gloo: [^()]*(closed|reset) by peer[^()]*\): "
        r"that process's output, or the system log for a kill or out of memory, says why; resume with "
        r"--ckpt_path last", said[0]), err0[-3000:]  # fmt: skip
    assert "Traceback" not in err0 and "pair.cc" not in err0
    [run] = list((tmp_path / "dcgan_fashion_mnist").iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_slurm_requeue_signal_on_one_task_checkpoints_once_and_trains_on(tmp_path):
    """SLURM signals every task itself, not all at the same moment. Lightning checkpointed inside its signal
    handler (collectives): a task signalled alone, or first, met the others' gradient all-reduce and the job
    hung. The ranks now agree at a batch end and requeue there, once."""
    probe = ["--trainer.callbacks+=fault_probe.SignalAt", "--trainer.callbacks.step", "4",
             "--trainer.callbacks.signum", str(int(signal.SIGUSR1)), "--trainer.callbacks.rank", "1"]  # fmt: skip
    args = tiny_fit_args(tmp_path, "--config", str(ROOT / "configs" / "cluster" / "slurm.yaml"),
                         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
                         "--trainer.default_root_dir", str(tmp_path), *probe)  # fmt: skip
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "gangen", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    outputs = launch_two(args, slurm, lambda rank: {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}, timeout=240)
    # Before gangen closed the process group at exit, task 1 aborted here about 1 run in 20 after all its work
    # ("terminate called without an active exception", exit -6): a gloo thread freed a finished broadcast's
    # tensors while Python was shutting down.
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    assert outputs[0][1].count("Handling auto-requeue signal") == 1  # rank 0 requeues, once
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["gangen"]["batches_seen"] == 3  # batch 2, in which rank 1 got the signal, finished
    run = tmp_path / "dcgan_fashion_mnist" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["gangen"]["batches_seen"] == 10


BAD_TRAINER = [
    (["--trainer.accelerator", "gpu"], ["--trainer.accelerator gpu", "no CUDA GPU", "--trainer.accelerator cpu"]),
    (["--trainer.accelerator", "cuda", "--trainer.devices", "64"], ["cuda", "no CUDA GPU"]),
    (["--trainer.strategy", "ddp_turbo"],
     ["'ddp_turbo'", "not a Lightning strategy", "ddp_find_unused_parameters_true"]),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.sync_batchnorm", "true"],
     ["--trainer.sync_batchnorm true", "GPUs only", "drop the flag"]),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "0"], ["--trainer.devices 0: use a count >= 1"]),
    (["--trainer.devices", "two"], ["--trainer.devices 'two'", "not a device count", "0,1"]),
    (["--trainer.gradient_clip_val", "1.0"], ["gradient_clip_val 1.0", "manual optimization", "drop the flag"]),
    (["--trainer.accumulate_grad_batches", "2"],
     ["accumulate_grad_batches 2", "manual optimization", "--data.batch_size"]),
    # were a 176-line crash at the first step (after the run folder was written) and a 39-line ImportError
    (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
     ["--trainer.strategy ddp", "plain DDP", "use ddp_find_unused_parameters_true"]),
    (["--trainer.strategy", "ddp_spawn_find_unused_parameters_false"],
     ["use ddp_spawn_find_unused_parameters_true"]),
    (["--trainer.accelerator", "tpu"], ["Lightning refused the trainer settings", "torch_xla"]),
]  # fmt: skip


@pytest.mark.parametrize("extra,needles", BAD_TRAINER, ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_trainer_settings(capsys, tmp_path, extra, needles):
    assert_fit_refused(capsys, tmp_path, extra, needles)  # one line, no run folder


def test_several_nodes_with_nothing_to_start_the_others_are_refused(capsys, tmp_path, monkeypatch):
    """`--trainer.num_nodes 2` typed on one machine used to wait silently for a second node, until the process
    group's timeout (30 minutes)."""
    for key in ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "SLURM_NTASKS", "LSB_JOBID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert_fit_refused(capsys, tmp_path, ["--trainer.num_nodes", "2", "--trainer.accelerator", "cpu"],
                       ["--trainer.num_nodes 2", "would wait", "slurm.sbatch", "torchrun", "NODE_RANK"])  # fmt: skip


def test_the_slurm_config_outside_a_slurm_task_is_one_line(capsys, tmp_path, monkeypatch):
    """It was a KeyError traceback from Lightning's SLURMEnvironment, inside Trainer(...)."""
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert_fit_refused(capsys, tmp_path, ["--config", str(ROOT / "configs" / "cluster" / "slurm.yaml"),
                                          "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
                       ["SLURMEnvironment", "outside a SLURM task", "SLURM_PROCID is not set", "srun"])  # fmt: skip


def test_what_starts_a_run_on_every_node(monkeypatch):
    from gangen.distributed import launched_per_node

    for key in ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "SLURM_NTASKS", "LSB_JOBID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_per_node(None) and not launched_per_node([])
    slurm = "lightning.pytorch.plugins.environments.SLURMEnvironment"
    for named in ({"class_path": slurm}, Namespace(class_path=slurm, init_args=Namespace(auto_requeue=True))):
        assert launched_per_node([named])  # a cluster environment named in the config (srun in an interactive
    assert launched_per_node(SLURMEnvironment())  # job, which Lightning does not detect) or in Python
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's own environment, set by hand on each node
    assert launched_per_node(None)
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a SLURM batch job
    monkeypatch.setenv("SLURM_JOB_NAME", "gangen")
    assert launched_per_node(None)


def test_refused_run_prints_one_line_on_stderr_as_a_user_sees_it(tmp_path):
    """In a real process Lightning's information lines ("Seed set to 0") went to stderr before the error, so
    a refused run printed two lines there; they go to stdout now, and stderr holds the one error line."""
    r = run_cli("fit", "--config", str(DEMO_CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.devices", "two")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "gangen: error: --trainer.devices 'two' is not a device count or list: use a number (2), GPU indices "
        "(0,1 or [0, 1]) or auto"
    ]
    assert "Seed set to 0" in r.stdout and list(tmp_path.iterdir()) == []


def test_refused_run_in_a_program_that_configured_logging_first(tmp_path):
    """A program (or pytest) with a root logging handler before Lightning is imported: Lightning's records
    then reach its top package's "INFO: ..." handler on stderr, so main() printed `INFO: Seed set to 0`
    there before the error line. The replacement handlers also write to the streams current at each
    record, so a later redirection is followed."""
    program = f"""
import contextlib, io, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from gangen.cli import main
out, err = io.StringIO(), io.StringIO()
for _ in range(2):  # main() again: the handlers are not stacked
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["fit", "--config", {str(DEMO_CONFIG)!r}, "--trainer.logger.init_args.save_dir", {str(tmp_path)!r},
                  "--trainer.devices", "two"])
        except SystemExit as stop:
            assert stop.code == 2, stop.code
print(repr(out.getvalue()))
print(repr(err.getvalue()))
"""
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out, err = (eval(line) for line in r.stdout.splitlines()[-2:])
    assert err.splitlines() == ["gangen: error: --trainer.devices 'two' is not a device count or list: use a number "
                                "(2), GPU indices (0,1 or [0, 1]) or auto"] * 2  # fmt: skip
    assert out.count("Seed set to 0") == 2 and list(tmp_path.iterdir()) == []


def test_sync_batchnorm_single_process_cpu_is_allowed():
    from gangen.distributed import check_trainer

    check_trainer({"accelerator": "cpu", "devices": 1, "sync_batchnorm": True})  # one process: nothing to sync


SLURM_ENV = {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "gangen", "SLURM_JOB_ID": "7",
             "SLURM_NODELIST": "localhost"}  # fmt: skip


@pytest.mark.parametrize("cluster", ["slurm", "torchrun"])
def test_cluster_configs_combine(cluster, tmp_path, monkeypatch):
    """The cluster configs build a DDP trainer (here shrunk to one CPU process); SLURM's requeues on SIGUSR1."""
    import re

    import yaml

    from gangen.cli import GANCLI
    from gangen.data import ImageDataModule
    from gangen.system import GAN

    for key, value in SLURM_ENV.items():
        if cluster == "slurm":
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    cli = GANCLI(GAN, ImageDataModule, run=False, auto_configure_optimizers=False, args=[
        "--config", str(DEMO_CONFIG), "--config", str(ROOT / "configs" / "cluster" / f"{cluster}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.limit", "64"])  # fmt: skip
    strategy = cli.trainer.strategy
    assert type(strategy).__name__ == "DDPStrategy" and strategy._ddp_kwargs.get("find_unused_parameters") is True
    if cluster == "slurm":
        assert type(strategy.cluster_environment).__name__ == "SLURMEnvironment"
        assert strategy.cluster_environment.auto_requeue
        sbatch = (ROOT / "configs" / "cluster" / "slurm.sbatch").read_text()
        trainer = yaml.safe_load((ROOT / "configs" / "cluster" / "slurm.yaml").read_text())["trainer"]
        assert f"--ntasks-per-node={trainer['devices']}" in sbatch and f"--nodes={trainer['num_nodes']}" in sbatch
        assert re.search(r"#SBATCH --signal=SIGUSR1@\d+", sbatch) and "srun python cli.py fit" in sbatch
    assert not any(tmp_path.iterdir())


def sbatch(tmp_path, job_id: str, *extra: str) -> subprocess.CompletedProcess:
    """configs/cluster/slurm.sbatch itself, as SLURM runs it for a one-task job (srun runs the command once, here
    on the CPU), with `extra` fit options after the config; runs go to tmp_path/runs/slurm-<job_id>."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", 'exec "$@"'), ("python", f'exec {sys.executable} "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, **SLURM_ENV, "SLURM_JOB_ID": job_id, "SLURM_JOB_NUM_NODES": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_ROOT": str(tmp_path / "runs"),
           "PYTHONPATH": str(ROOT / "tests")}  # fmt: skip
    for key in ("GANGEN_DEBUG", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    tiny = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--data.limit", "256", "--data.batch_size", "64",
            "--trainer.callbacks+=ddp_probe.DumpParams", "--trainer.callbacks.folder",
            str(tmp_path / "runs" / f"slurm-{job_id}")]  # fmt: skip
    script = ROOT / "configs" / "cluster" / "slurm.sbatch"
    return subprocess.run(["bash", str(script), str(DEMO_CONFIG), *tiny, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def signal_at(batch: int, signum: int) -> list[str]:
    return ["--trainer.callbacks+=fault_probe.SignalAt", "--trainer.callbacks.step", str(2 * batch),
            "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip


@pytest.fixture(scope="module")
def straight_job(tmp_path_factory) -> dict:
    """The sbatch job that never stopped: its final parameters."""
    tmp_path = tmp_path_factory.mktemp("straight_job")
    r = sbatch(tmp_path, "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no last.ckpt under" in r.stdout and "training from scratch" in r.stdout  # a first start
    return torch.load(tmp_path / "runs" / "slurm-1" / "params_rank0.pt")


@pytest.mark.parametrize("option", ["--ckpt_path", "--trainer.devices", "--trainer.logger.init_args.save_dir"])
def test_sbatch_refuses_the_options_the_job_sets_itself(option, tmp_path):
    """Options after the config come before the job's own, and the last one wins: a --ckpt_path given there (to
    start from another run) was silently replaced by `last`, and the first start trained from scratch."""
    r = sbatch(tmp_path, "9", option, "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"slurm.sbatch: error: {option} is set by the job itself (--ckpt_path last, the #SBATCH sizes, runs in "
        "$RUN_ROOT/slurm-<job id>): leave it out; to start from another run's weights pass --model.init_from PATH, "
        "for other sizes edit the #SBATCH lines, for another folder set RUN_ROOT"
    ], r.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("stop", ["preempted", "time_limit"])
def test_requeued_sbatch_job_resumes_from_the_newest_checkpoint(stop, straight_job, tmp_path):
    """A requeued job runs the sbatch command again. Preempted (SIGTERM): gangen saved last.ckpt in the run
    folder, and an older hpc_ckpt from an earlier time-limit requeue lies in the job folder; the time limit
    (SIGUSR1, then killed): Lightning saved hpc_ckpt_1.ckpt after the epoch's last.ckpt. The requeued job
    resumes from the newest and ends as the job that never stopped (it used to train from scratch, or from a
    stale hpc_ckpt)."""
    straight = straight_job
    job = tmp_path / "runs" / "slurm-2"
    run = job / "dcgan_fashion_mnist" / "version_0" / "checkpoints"
    if stop == "preempted":
        r = sbatch(tmp_path, "2", *signal_at(6, signal.SIGTERM))  # 2 batches into epoch 1
        assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
        stale = job / "hpc_ckpt_1.ckpt"
        stale.write_bytes((run / "epoch=0-step=8.ckpt").read_bytes())  # as an earlier requeue leaves it
        os.utime(stale, (os.path.getmtime(run / "last.ckpt") - 60,) * 2)
        newest = run / "last.ckpt"
    else:
        r = sbatch(tmp_path, "2", *signal_at(6, signal.SIGUSR1), *signal_at(7, signal.SIGKILL))
        assert r.returncode == 128 + signal.SIGKILL, r.stderr[-3000:]
        assert "Handling auto-requeue signal" in r.stdout
        newest = job / "hpc_ckpt_1.ckpt"
    assert not (job / "params_rank0.pt").exists()
    r = sbatch(tmp_path, "2")  # the requeue: the same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gangen: resuming from {newest}\n" in r.stdout
    resumed = torch.load(job / "params_rank0.pt")
    assert int(resumed["images_seen"]) == 2 * 256
    assert straight.keys() == resumed.keys()
    assert not [key for key in straight if not torch.equal(straight[key], resumed[key])]  # bitwise


def test_the_torchrun_restart_warning_names_the_shared_store_and_the_fix():
    from gangen.distributed import torchrun_restart_warning

    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    shared["TORCHELASTIC_RESTART_COUNT"] = "0"
    assert torchrun_restart_warning(shared) == (
        "gangen: warning: torchrun --max-restarts 3 with the rendezvous store shared with the workers: a restart can "
        "fail to connect (the failed attempt's addresses stay in the store, pytorch issue 135712); start torchrun "
        "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv_backend c10d --rdzv_endpoint HOST:PORT "
        "(--master_addr/--master_port always share it)"
    )
    for quiet in (
        {**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"},  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        {**shared, "TORCHELASTIC_MAX_RESTARTS": "0"},  # no restart asked for
        {**shared, "TORCHELASTIC_RESTART_COUNT": "1"},  # a restart: said at the first start
        {},  # not under torchrun
    ):
        assert torchrun_restart_warning(quiet) is None, quiet

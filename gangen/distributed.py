"""Checks of the Trainer's device, strategy and process settings, made before anything is built or written.

Lightning refuses bad settings deep inside `Trainer(...)` with a traceback, or (SyncBatchNorm on CPU) only
inside the first forward pass of a multi-process run. These checks turn them into one-line ConfigErrors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from gangen.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


def device_count(devices: Any) -> int | None:
    """Processes per node asked for by `devices` (int, "N", "0,1", [0, 1]); None for "auto" / -1."""
    try:
        if isinstance(devices, str):
            devices = devices.strip()
            if devices in ("auto", "-1"):
                return None
            if "," in devices:
                return len(device_indices(devices))
        if isinstance(devices, (list, tuple)):
            return len(device_indices(devices))
        count = None if devices in (None, -1) else int(devices)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"--trainer.devices {devices!r} is not a device count or list: use a number (2), GPU indices "
            "(0,1 or [0, 1]) or auto"
        ) from e
    if count is not None and count < 1:  # Lightning's refusals: one of a type, one of a value, per accelerator
        raise ConfigError(f"--trainer.devices {devices}: use a count >= 1, GPU indices (0,1 or [0, 1]), -1 or auto")
    return count


def device_indices(devices: Any) -> list[int]:
    """The device indices of "0,1" or [0, 1] (ValueError for anything else)."""
    items = devices.split(",") if isinstance(devices, str) else devices
    return [int(d) for d in items if str(d).strip()]


def multi_process(trainer: Any) -> bool:
    """Whether Trainer settings ask for more than one process (devices x nodes)."""
    count, nodes = device_count(trainer.get("devices", "auto")), int(trainer.get("num_nodes") or 1)
    if count is None:  # "auto" / -1: every GPU if the accelerator may be a GPU, else one process
        gpu = trainer.get("accelerator", "auto") in ("auto", *GPU_ACCELERATORS)
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    return count * nodes > 1


def check_trainer(trainer: Any) -> None:
    """Devices that exist, a strategy Lightning knows, SyncBatchNorm only where PyTorch supports it."""
    from lightning.pytorch.strategies import StrategyRegistry

    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", "auto")
    strategy = trainer.get("strategy", "auto")
    device_count(devices)  # a count, a list or auto: one line otherwise
    # Lightning refuses these for manual optimization (gangen's G/D steps) only once fit starts, with a traceback
    if (trainer.get("gradient_clip_val") or 0) > 0:
        raise ConfigError(
            f"--trainer.gradient_clip_val {trainer['gradient_clip_val']}: Lightning does not clip gradients "
            "under manual optimization, which gangen's G and D steps use; drop the flag (R1, --model.reg r1, is "
            "the usual way to keep D's gradients in check)"
        )
    if (trainer.get("accumulate_grad_batches") or 1) != 1:
        raise ConfigError(
            f"--trainer.accumulate_grad_batches {trainer['accumulate_grad_batches']}: Lightning does not "
            "accumulate gradients under manual optimization, which gangen's G and D steps use; drop the flag "
            "and raise --data.batch_size (or train on more devices)"
        )
    listed = isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices)
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if listed and cpu:  # Lightning: a TypeError traceback
        where = "this machine has no CUDA GPU"
        where = "training runs on the CPU (--trainer.accelerator cpu)" if accelerator == "cpu" else where
        raise ConfigError(
            f"--trainer.devices {devices} lists GPU indices, but {where}: give a process count (--trainer.devices "
            f"{device_count(devices)})"
        )
    if isinstance(accelerator, str) and accelerator.lower() in GPU_ACCELERATORS:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError(
                f"--trainer.accelerator {accelerator}: no CUDA GPU is available on this machine; "
                "use --trainer.accelerator cpu (or auto)"
            )
        wanted = device_count(devices)
        indices = device_indices(devices) if listed else []
        if (wanted or 0) > available or any(i >= available for i in indices):
            raise ConfigError(
                f"--trainer.devices {devices}: this machine has {available} CUDA GPU(s); "
                f"ask for at most {available} (or --trainer.devices auto)"
            )
    if isinstance(strategy, str) and strategy.lower() != "auto":
        known = StrategyRegistry.available_strategies()
        if strategy.lower() not in known:
            usual = ("ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_true")
            common = ["auto"] + [s for s in usual if s in known]
            raise ConfigError(
                f"--trainer.strategy {strategy!r} is not a Lightning strategy: use one of {', '.join(common)} "
                "(or see lightning.pytorch.strategies.StrategyRegistry)"
            )
        unused = strategy.lower().removesuffix("_find_unused_parameters_false") + "_find_unused_parameters_true"
        if (
            unused in known and strategy.lower() != unused
        ):  # plain DDP: each backward of the G/D step uses one network of the one DDP wrapper
            raise ConfigError(
                f"--trainer.strategy {strategy}: plain DDP stops at gangen's first step (each backward uses only "
                f"one of the two networks it wraps): use {unused} (what auto picks)"
            )
    for key in ("val_check_interval", "check_val_every_n_epoch"):  # Lightning: ZeroDivisionError mid-fit
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value <= 0:
            what = "batches, or a fraction of an epoch in (0, 1]" if key == "val_check_interval" else "epochs"
            raise ConfigError(f"--trainer.{key} {value} must be > 0 ({what})")
    check_slurm_plugin(trainer.get("plugins"))
    nodes = trainer.get("num_nodes") or 1
    if isinstance(nodes, int) and nodes > 1 and not launched_per_node(trainer.get("plugins")):
        raise ConfigError(
            f"--trainer.num_nodes {nodes}: nothing starts this run on the other nodes, so it would wait for them "
            "until the process group times out; run it under SLURM (configs/cluster/slurm.sbatch) or torchrun, "
            "or the same command on every node with NODE_RANK, MASTER_ADDR and MASTER_PORT set"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if trainer.get("sync_batchnorm") and on_cpu and multi_process(trainer):
        raise ConfigError(
            "--trainer.sync_batchnorm true: PyTorch's SyncBatchNorm works on GPUs only; "
            "drop the flag on CPU (or train on GPUs with --trainer.accelerator gpu)"
        )


SLURM_TASK_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_NODELIST")


def _plugin_paths(plugins: Any) -> list[Any]:
    """The class paths of `--trainer.plugins` entries (config dicts or Namespaces), or the objects themselves."""
    named = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return [plugin.get("class_path", "") if hasattr(plugin, "get") else plugin for plugin in named]


def check_slurm_plugin(plugins: Any) -> None:
    """Lightning's SLURMEnvironment named (configs/cluster/slurm.yaml) outside a SLURM task crashed with a
    KeyError traceback in Trainer(...): one line instead."""
    if not any(isinstance(p, str) and p.endswith("SLURMEnvironment") for p in _plugin_paths(plugins)):
        return
    missing = [key for key in SLURM_TASK_VARIABLES if key not in os.environ]
    if missing:
        raise ConfigError(
            f"--trainer.plugins SLURMEnvironment (configs/cluster/slurm.yaml) outside a SLURM task: {missing[0]} "
            "is not set; start it with srun (sbatch configs/cluster/slurm.sbatch), or leave that config out"
        )


def launched_per_node(plugins: Any = None) -> bool:
    """Whether something starts this process on every node: a cluster Lightning detects (SLURM batch job,
    torchrun, LSF, MPI), one named in `--trainer.plugins`, or the variables Lightning's own
    environment reads (NODE_RANK or GROUP_RANK, MASTER_ADDR). Without any, num_nodes > 1 can only wait."""
    from lightning.fabric.plugins import environments as envs

    if any(os.environ.get(key) for key in ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR")):
        return True
    for path in _plugin_paths(plugins):
        if isinstance(path, envs.ClusterEnvironment) or (isinstance(path, str) and "Environment" in path):
            return True
    clusters = (envs.SLURMEnvironment, envs.TorchElasticEnvironment, envs.LSFEnvironment, envs.MPIEnvironment)
    return any(cluster.detect() for cluster in clusters)  # what Lightning looks for, in its order


def torchrun_restart_warning(environ: Mapping[str, str] = os.environ) -> str | None:
    """The warning for a torchrun job with restarts whose workers share the launcher's rendezvous store.

    torch keeps one store for all attempts when the workers share it (TORCHELASTIC_USE_AGENT_STORE: the c10d
    rendezvous by default, --master_addr/--master_port always), and init_process_group's keys carry no attempt:
    a restarted rank can read the dead rank 0's address from the failed attempt and give up connecting
    (pytorch/pytorch#135712; torch 2.14.1, gloo, 2 processes whose restarted rank 0 reached init_process_group
    5 s after rank 1: 15 of 20 restarts failed to connect or hung, none with the variable below).
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 with the c10d rendezvous gives every attempt a new store. None where
    no restart is asked for, outside torchrun, and in the restarts themselves (said at the first start)."""
    restarts = environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if not restarts.isdigit() or int(restarts) < 1 or environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return (
        f"gangen: warning: torchrun --max-restarts {restarts} with the rendezvous store shared with the workers: "
        "a restart can fail to connect (the failed attempt's addresses stay in the store, pytorch issue 135712); "
        "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv_backend c10d --rdzv_endpoint "
        "HOST:PORT (--master_addr/--master_port always share it)"
    )


def global_batch(per_device: int, devices: int, nodes: int) -> str:
    """The one line that states the global batch of a run."""
    d, n = "device" if devices == 1 else "devices", "node" if nodes == 1 else "nodes"
    total = per_device * devices * nodes
    return f"gangen: global batch {total} = {per_device} per device x {devices} {d} x {nodes} {n}"


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite `module`'s buffers (batchnorm running statistics) with rank `src`'s, in place, on every rank.

    A collective: every rank must call it. Nothing happens outside an initialised process group of 2 or more.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)

"""The memory checks (network widths, generate's size) compare with what this process may use: a container's or a
batch job's cgroup limit where it is below the machine's RAM. They compared with the machine's RAM only, so a job
limited to a few GiB on a large machine went on and was killed by the kernel instead of told."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import DEMO_CONFIG, ROOT

from gangen.cache_dir import cgroup_memory_limit, human, physical_memory, usable_memory

GIB = 2**30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_limits_are_read_along_the_path_and_the_lowest_wins(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/job\n4:memory:/slurm/job_7\n0::/\n")
    root = tmp_path / "fs"
    write(root / "memory" / "memory.limit_in_bytes", str(2**63 - 4096))  # v1's "unlimited"
    write(root / "memory" / "slurm" / "memory.limit_in_bytes", str(8 * GIB))
    write(root / "memory" / "slurm" / "job_7" / "memory.limit_in_bytes", str(3 * GIB))
    assert cgroup_memory_limit(str(proc), str(root)) == 3 * GIB
    write(root / "memory" / "slurm" / "job_7" / "memory.limit_in_bytes", str(16 * GIB))  # a parent's is lower
    assert cgroup_memory_limit(str(proc), str(root)) == 8 * GIB


def test_v2_max_and_a_container_mount_at_the_top(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/run.scope\n")
    root = tmp_path / "fs"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / "user.slice" / "memory.max", "max\n")
    assert cgroup_memory_limit(str(proc), str(root)) is None  # "max": no limit
    write(root / "memory.max", f"{5 * GIB}\n")  # a container's own cgroup, mounted at the top
    assert cgroup_memory_limit(str(proc), str(root)) == 5 * GIB
    assert cgroup_memory_limit(str(tmp_path / "missing"), str(root)) is None  # not Linux


def test_usable_memory_is_the_machine_without_a_limit_below_it():
    usable = usable_memory()
    limit = cgroup_memory_limit()
    assert usable is not None
    if limit is None or limit >= physical_memory():
        assert usable == (physical_memory(), f"this machine's {human(physical_memory())} of memory")
    else:
        assert usable[0] == limit and "cgroup" in usable[1]


MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def limited_cgroup():
    """A real cgroup v1 memory cgroup limited to 1 GiB (needs root and a writable cgroup v1 memory hierarchy, which
    this project's machines and CI have)."""
    if os.geteuid() != 0 or not (MEMORY_CGROUP / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    group = MEMORY_CGROUP / f"gangen-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(GIB))
        yield group
    finally:
        group.rmdir()  # empty again once its processes have exited


def test_fit_under_a_real_cgroup_limit_names_it(limited_cgroup, tmp_path):
    """latent_dim 400000: about 0.8 billion weights, 3.1 GiB as float32: fits this machine, not the 1 GiB cgroup.
    Before, the process was killed by the kernel while initialising the weights (or swapped)."""
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(DEMO_CONFIG),
               "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
               "--model.generator.latent_dim", "400000"]  # fmt: skip
    if 3.2 * GIB > physical_memory():
        pytest.skip("this machine has less than 3.2 GiB of RAM: the check would name the machine, not the cgroup")
    result = subprocess.run(
        ["sh", "-c", f'echo $$ > {limited_cgroup}/cgroup.procs && exec "$@"', "sh", *command],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("gangen: error: DCGANGenerator(latent_dim=400000, base_channels=32"), lines
    assert "more than the 1.0 GiB this process may use (its cgroup's memory limit): lower latent_dim" in lines[-1]
    assert list(tmp_path.iterdir()) == []

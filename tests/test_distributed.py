"""utils/distributed.py's view of the machine: the cores a cgroup quota leaves usable."""

from __future__ import annotations

import pytest

from utils import distributed


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "250000 100000\n"}, 2.5),  # cgroup v2, docker --cpus=2.5
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cgroup_cpu_quota_in_cores(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path / name, text)
    assert distributed.cgroup_cpu_quota(str(tmp_path)) == quota


def test_a_quota_below_the_affinity_lowers_usable_cores_and_auto_workers(monkeypatch):
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(distributed, "cgroup_cpu_quota", lambda root="/sys/fs/cgroup": None)
    assert distributed.usable_cores() == 16
    monkeypatch.setattr(distributed, "cgroup_cpu_quota", lambda root="/sys/fs/cgroup": 4.5)
    assert distributed.usable_cores() == 4
    assert distributed.loader_workers_per_process("auto", local_world_size=1) == 3
    monkeypatch.setattr(distributed, "cgroup_cpu_quota", lambda root="/sys/fs/cgroup": 0.5)
    assert distributed.usable_cores() == 1

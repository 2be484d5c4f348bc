"""The CPU budget comes from what the process may use, and splits never exceed it."""

from __future__ import annotations

import os

import pytest

from featscope.pipelines.core import cpus


def test_the_budget_is_the_smallest_of_affinity_quota_and_omp(monkeypatch, tmp_path):
    monkeypatch.setattr(cpus, "_affinity", lambda: 16)
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 6.5)
    monkeypatch.setattr(cpus, "OMP_AT_START", "")
    assert cpus.usable_cpus() == 6
    monkeypatch.setattr(cpus, "OMP_AT_START", "3")
    assert cpus.usable_cpus() == 3
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 0.5)
    assert cpus.usable_cpus() == 1


def test_cgroup_v2_and_v1_quotas_are_read(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cpus._cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpus._cgroup_quota(tmp_path) == 3.0


@pytest.mark.parametrize("budget", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("workers, threads", [(None, None), (2, None), (None, 2), (3, None)])
def test_a_split_never_uses_more_threads_than_the_budget(budget, workers, threads):
    w, t = cpus.split(workers, threads, budget)
    assert w >= 1 and t >= 1
    assert w * t <= max(budget, (workers or 1) * (threads or 1))
    if workers:
        assert w == workers
    if threads:
        assert t == threads


def test_the_real_budget_is_within_the_affinity():
    assert 1 <= cpus.usable_cpus() <= len(os.sched_getaffinity(0))

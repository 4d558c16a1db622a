"""data.workers: auto — the workers a rank gets from the CPUs its pod has."""

from __future__ import annotations

import pytest

from tests.builders import job_doc, with_path
from thaw_contract.spec import SpecError, parse_job
from trainer import cpus
from trainer.cpus import auto_workers, cgroup_cpus, cpu_quantity


def test_a_rank_gets_its_share_of_the_cpus_less_one_for_the_training_process():
    assert auto_workers(2, 2) == 0  # this machine under torchrun: each rank decodes itself
    assert auto_workers(2, 1) == 1
    assert auto_workers(8, 1) == 7 and auto_workers(8, 2) == 3 and auto_workers(7.5, 2) == 2
    assert auto_workers(64, 1) == cpus.MAX_WORKERS and auto_workers(0.5, 1) == 0


def test_cpu_quantities_and_cgroup_limits_read_as_cores(tmp_path):
    assert cpu_quantity("3500m") == 3.5 and cpu_quantity("2") == 2.0 and cpu_quantity("0.5") == 0.5
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # cgroup v2: 2.5 CPUs
    assert cgroup_cpus(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v1) == 4.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(v1) is None and cgroup_cpus(tmp_path / "none") is None


def test_the_least_of_affinity_cgroup_and_the_pods_cpu_is_what_a_pod_has(monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr(cpus, "cgroup_cpus", lambda: 6.0)
    assert cpus.available_cpus(None) == 6.0
    assert cpus.available_cpus("4") == 4.0  # spec.resources.cpu, where the node does not enforce it
    monkeypatch.setattr(cpus, "cgroup_cpus", lambda: None)
    assert cpus.available_cpus(None) == 16.0 and cpus.available_cpus("20") == 16.0


def test_workers_is_auto_by_default_and_a_count_or_auto_otherwise():
    assert parse_job(job_doc()).spec.data.workers == "auto"
    assert parse_job(with_path(job_doc(), "spec.data.workers", 3)).spec.data.workers == 3
    for bad in ("many", True, 1.5):
        with pytest.raises(SpecError, match=r"^spec.data.workers: must be a whole number >= 0 or auto"):
            parse_job(with_path(job_doc(), "spec.data.workers", bad))


def test_auto_gives_workers_only_to_images_that_need_decoding(tmp_path, monkeypatch):
    import torch
    from torch.utils.data import Subset, TensorDataset

    from tests.unit.test_data_splits import _folder
    from thaw_contract.spec import DataSpec
    from trainer import loaders
    from trainer.data import build_datasets
    from trainer.distributed import DistEnv
    from trainer.loaders import loader_workers

    monkeypatch.setattr(loaders, "available_cpus", lambda requested: 8.0)
    env = DistEnv(0, 2, 0, 2, torch.device("cpu"))  # two ranks on this host: 4 CPUs each
    folder = build_datasets(DataSpec(source=_folder(tmp_path), image_size=16, val_per_class=1), 2, 0)
    in_memory = build_datasets(DataSpec(source="digits", image_size=16, val_per_class=1), 10, 0)
    job = parse_job(job_doc())
    assert loader_workers(job, env, folder.train) == 3 and loader_workers(job, env, Subset(folder.val, [0])) == 3
    assert loader_workers(job, env, in_memory.train) == 0  # nothing to decode: workers would only add IPC
    assert loader_workers(job, env, TensorDataset(torch.zeros(2, 3))) == 0  # cached features
    fixed = parse_job(with_path(job_doc(), "spec.data.workers", 2))
    assert loader_workers(fixed, env, in_memory.train) == 2 and loader_workers(fixed, env, folder.train) == 2

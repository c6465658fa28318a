"""Cluster mode without a cluster: the driver's runtime env defers to the job's, ephemeral run stores are
refused, and an unreachable head is one line within the connect timeout."""

from __future__ import annotations

import json
import socket
import time

import pytest

from common.errors import UsageError
from orchestrator.ray_connect import (
    DRIVER_ENV_VARS,
    RAY_JOB_CONFIG_ENV,
    ClusterUnreachable,
    check_durable_store,
    driver_runtime_env,
    in_cluster_mode,
    probe_cluster,
)


def _job(monkeypatch, env_vars: dict) -> None:
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": env_vars, "pip": ["x"]},
                                                      "metadata": {}}))


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for key in (*DRIVER_ENV_VARS, RAY_JOB_CONFIG_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)


def test_the_jobs_env_vars_win_and_only_absent_ones_are_added(monkeypatch):
    assert driver_runtime_env() == {"env_vars": DRIVER_ENV_VARS}
    # deploy/runtime_env.yaml sets both: ray.init must get no env var of its own (a conflict is fatal).
    _job(monkeypatch, {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                       "OMP_NUM_THREADS": "8"})
    assert driver_runtime_env() is None
    _job(monkeypatch, {"TOKENIZERS_PARALLELISM": "true"})
    assert driver_runtime_env() == {"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}}
    assert in_cluster_mode(None)


def test_ray_merges_what_the_driver_passes_with_the_jobs_runtime_env(monkeypatch):
    # The very merge ray.init performs inside a submitted job (ray/_private/worker.py).
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}, "pip": ["x"]}
    _job(monkeypatch, job["env_vars"])
    assert _merge_runtime_env(job, driver_runtime_env()) is not None
    _job(monkeypatch, {"PYTHONUNBUFFERED": "1"})
    merged = _merge_runtime_env({"env_vars": {"PYTHONUNBUFFERED": "1"}}, driver_runtime_env())
    assert merged["env_vars"] == {"PYTHONUNBUFFERED": "1", **DRIVER_ENV_VARS}


def test_cluster_mode_refuses_ephemeral_run_stores(tmp_path):
    for uri in ("runs/digits", "memory://x", "/tmp/ray/session/runtime_resources/working_dir_files/_ray_pkg_1/runs/d"):
        with pytest.raises(UsageError, match=r"s3://.*--allow-local-store"):
            check_durable_store(uri, cluster_mode=True, allow_local_store=False)
        check_durable_store(uri, cluster_mode=True, allow_local_store=True)  # told to: accepted
        check_durable_store(uri, cluster_mode=False, allow_local_store=False)  # local mode: fine
    for uri in ("s3://bucket/run", str(tmp_path / "shared"), f"file://{tmp_path}/shared"):
        check_durable_store(uri, cluster_mode=True, allow_local_store=False)


def test_a_dead_head_is_one_line_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachable) as exc:
        probe_cluster(f"127.0.0.1:{port}", timeout_s=3)
    assert time.monotonic() - t0 < 3.5
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"no Ray cluster answers at 127.0.0.1:{port} within 3s")
    # A host that drops packets (TEST-NET-1, never routed) waits out the timeout, then says so.
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="within 1s"):
        probe_cluster("192.0.2.123:6379", timeout_s=1)
    assert time.monotonic() - t0 < 2
    with pytest.raises(ClusterUnreachable, match="expected HOST:PORT"):
        probe_cluster("headnode", timeout_s=1)

"""Prepare at scale: a SIGKILLed prepare resumes keeping its committed shards; encoder actors never wait
for GPUs the cluster cannot give; parallel cluster assignment equals the sequential one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.config import RunConfig
from common.manifests import ClusterManifest, DatasetManifest
from common.storage import RunStore
from worker.partition import cluster_data
from worker.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[2]


def digits(n: int, shard_rows: int, **over) -> RunConfig:
    cfg = {"data": {"source": "builtin:digits", "image_size": 8, "channels": 1, "max_items": n, "shard_rows": shard_rows},
           "features": {"extractor": "pixels", "pixels_size": 4},
           "clustering": {"num_experts": 4, "num_fine_centroids": 32}, "training": {"global_batch": 8}}
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return RunConfig.model_validate(cfg)


def _python(script: str, timeout: float | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_prepare_killed_midway_resumes_keeping_committed_shards(tmp_path):
    cfg = digits(400, shard_rows=4)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    run = tmp_path / "run"
    proc = _python(f"""
        from common.config import RunConfig
        from common.storage import RunStore
        from worker.prepare import prepare_data
        prepare_data(RunConfig.model_validate_json(open({str(tmp_path / 'cfg.json')!r}).read()), RunStore({str(run)!r}))
    """)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((run / "data" / "parts").glob("*.json"))) < 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = RunStore(str(run))
    committed = len(store.list("data/parts"))
    assert committed >= 10 and not store.exists("data/dataset.json"), "the killed prepare had already finished"

    resumed = prepare_data(cfg, store)
    assert resumed.details["resumed_shards"] == committed  # a part record is written atomically, after its shard
    fresh = prepare_data(cfg, RunStore(str(tmp_path / "fresh")))
    assert [o.sha256 for o in resumed.outputs] == [o.sha256 for o in fresh.outputs]
    assert resumed.counts == fresh.counts == {"discovered": 400, "used": 400, "quarantined": 0, "shards": 100}


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_encoders_are_capped_by_the_gpus_the_cluster_has(tmp_path):
    """num_workers = 2 with use_gpu on a Ray that advertises one GPU: one encoder actor, no hang.
    (The encoders are told to use the CPU; the GPU is only a scheduling resource here.) On this fresh Ray,
    the driver's early start of Ray Data's service actors creates them before any dataset does."""
    cfg = digits(600, shard_rows=100, prepare={"num_workers": 2, "use_gpu": True},
                 features={"device": "cpu"}, latents={"device": "cpu"})
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    proc = _python(f"""
        import json, ray
        from common.config import RunConfig
        from common.storage import RunStore
        from worker.prepare import prepare_data
        for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s raylet start-up wait
            try:
                ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=100 * 2**20,
                         _temp_dir="/tmp/ddmg{os.getpid()}", log_to_driver=False)
                break
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
        from orchestrator.ray_connect import start_ray_data_services
        start_ray_data_services()
        services = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
        result = prepare_data(RunConfig.model_validate_json(open({str(tmp_path / 'cfg.json')!r}).read()),
                              RunStore({str(tmp_path / 'run')!r}))
        print("RESULT", json.dumps({{"counts": result.counts, "pids": result.details["encode_processes"],
                                     "services": services}}))
        ray.shutdown()
    """)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"prepare with use_gpu and 1 GPU did not finish in 300 s (hung):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
    assert result["counts"]["used"] == 600 and len(result["pids"]) == 1
    assert {"ActorLocationTracker", "AutoscalingCoordinator", "datasets_stats_actor"} <= set(result["services"])


@pytest.mark.ray
@pytest.mark.slow
def test_parallel_assignment_equals_the_sequential_one(ray_session, tmp_path):
    sequential, parallel = RunStore(str(tmp_path / "seq")), RunStore(str(tmp_path / "par"))
    for store, min_rows in ((sequential, 10**9), (parallel, 1)):
        cfg = digits(900, shard_rows=100, clustering={"parallel_min_rows": min_rows})
        prepare_data(cfg, store)
        result = cluster_data(cfg, store)
        assert result.details["parallel_assignment"] == (min_rows == 1)
    a, b = (s.read_record("clusters/clusters.json", ClusterManifest) for s in (sequential, parallel))
    assert a.sizes == b.sizes and [r.sha256 for r in a.assignments] == [r.sha256 for r in b.assignments]
    assert sequential.read_record("data/dataset.json", DatasetManifest).used == 900

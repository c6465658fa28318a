"""Faults: a killed node's expert resumes elsewhere on its island; a killed driver is survived by rerunning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.manifests import JobStatusRecord, StageRecord
from common.storage import RunStore

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
# A short gmm run: two experts of 2 x 2 points on two islands, checkpoints every few steps.
SMALL = ["data.gmm_items=1024", "data.gmm_components=2", "clustering.num_experts=2",
         "clustering.num_fine_centroids=16", "training.global_batch=128", "training.duration_nimg=12800",
         "training.checkpoint_every_nimg=3200", "training.log_every_nimg=640",
         "router.training.duration_nimg=6400", "router.training.checkpoint_every_nimg=3200",
         "islands.assignment={0: island-a, 1: island-b}", "router.island=island-b", "islands.max_retries=2",
         "prepare.num_workers=1"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def _metrics_rows(store: RunStore, prefix: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(f"{prefix}/metrics.jsonl").decode().splitlines() if line]


@pytest.mark.slow
def test_node_loss_resumes_expert_on_matching_node(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "tests/integration/fault_scenario.py"), str(run), *SMALL],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result_lines, done.stderr[-3000:]
    result = json.loads(result_lines[0][len("RESULT "):])
    assert result["killed"], "the expert's node was never killed"
    store = RunStore(str(run))
    hit = store.read_record("experts/00/status.json", JobStatusRecord)
    other = store.read_record("experts/01/status.json", JobStatusRecord)
    assert hit.state == "succeeded" and hit.retries == 1 and hit.attempts == 2
    survivor = [n for n in result["worker_nodes"] if n != result["killed"]["node"]][0]
    assert hit.node == survivor  # retried on the remaining island-a node
    assert store.exists("experts/00/export.json") and store.exists("experts/01/export.json")
    # The killed expert resumed from a checkpoint: its log may step back to that checkpoint, never to zero.
    seen = [row["nimg"] for row in _metrics_rows(store, "experts/00")]
    drops = [i for i in range(1, len(seen)) if seen[i] <= seen[i - 1]]
    assert seen.count(seen[0]) == 1 and all(seen[i] > 3200 for i in drops) and seen[-1] == 12800
    # ... while the other expert never restarted.
    assert other.state == "succeeded" and other.attempts == 1 and other.retries == 0
    seen = [row["nimg"] for row in _metrics_rows(store, "experts/01")]
    assert seen == sorted(set(seen))


@pytest.mark.slow
def test_driver_killed_mid_run_is_resumed_without_redoing_committed_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "run", "--preset", "gmm", "--run", str(run), "--quiet", "--until", "train",
           *[arg for item in SMALL for arg in ("--set", item)]]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = RunStore(str(run))
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once training has committed a checkpoint
        if first.poll() is not None:
            pytest.fail(f"driver exited early: {first.stderr.read().decode()[-2000:]}")
        if store.exists("experts/00/checkpoints") and any(
                k.endswith(".json") for k in store.list("experts/00/checkpoints/")):
            break
        time.sleep(0.2)
    else:
        pytest.fail("training never committed a checkpoint")
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, like a lost machine
    first.wait()
    before = {s: store.read_record(f"stages/{s}.json", StageRecord) for s in ("prepare", "cluster", "train")}
    assert before["prepare"] and before["cluster"] and before["train"] is None
    exported_before = {p: store.read_bytes(f"{p}/export.json") for p in ("experts/00", "experts/01", "router")
                       if store.exists(f"{p}/export.json")}

    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = {s: store.read_record(f"stages/{s}.json", StageRecord) for s in ("prepare", "cluster", "train")}
    redone = [s for s in ("prepare", "cluster") if after[s].started_at != before[s].started_at]
    assert redone == [], f"committed stages redone: {redone}"
    assert after["train"] is not None
    for prefix, raw in exported_before.items():  # committed exports are never redone either
        assert store.read_bytes(f"{prefix}/export.json") == raw
    # The interrupted expert resumed from its checkpoint rather than from zero.
    seen = [row["nimg"] for row in _metrics_rows(store, "experts/00")]
    restarts = [i for i in range(1, len(seen)) if seen[i] <= seen[i - 1]]
    assert seen.count(seen[0]) == 1 and all(seen[i] > 3200 for i in restarts) and seen[-1] == 12800

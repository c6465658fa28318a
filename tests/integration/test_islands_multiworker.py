"""Multi-worker islands on a multi-node cluster: every Ray Train worker lands on the island's labelled
nodes and progress reaches the driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.manifests import JobStatusRecord, StageRecord
from common.storage import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.gmm_items=1024", "data.gmm_components=2", "clustering.num_experts=2",
         "clustering.num_fine_centroids=16", "training.global_batch=128", "training.duration_nimg=12800",
         "training.checkpoint_every_nimg=2560", "training.log_every_nimg=640",
         "router.training.duration_nimg=2560", "islands.assignment={0: island-a, 1: island-b}",
         "router.island=island-b", "prepare.num_workers=1"]


def _scenario(run: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "tests/integration/island_scenario.py"), str(run), *SMALL],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def _train_record(store: RunStore) -> StageRecord:
    return store.read_record("stages/train.json", StageRecord)


def test_two_worker_island_lands_only_on_its_labelled_nodes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _scenario(run)
    store = RunStore(str(run))
    nodes = _train_record(store).details["nodes"]
    # Both Ray Train workers of expert-00, on two distinct labelled nodes; never the decoy that has
    # the island-a resource but not the label, never the head (island-b).
    assert len(nodes["expert-00"]) == 2 and set(nodes["expert-00"]) <= set(result["labelled"]), (nodes, result)
    assert nodes["expert-01"] == [result["head"]] and nodes["router"] == [result["head"]]
    status = store.read_record("experts/00/status.json", JobStatusRecord)
    assert status.state == "succeeded" and status.nimg == 12800  # progress from rank 0 reached the driver
    assert status.node in result["labelled"]  # the slot actor driving the group is on the island too
    assert any(k.startswith("tb/expert-00/events.out.tfevents") for k in store.list("tb/expert-00/"))

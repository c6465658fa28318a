"""Multi-worker islands on a multi-node cluster: every Ray Train worker lands on the island's labelled
nodes, progress reaches the driver, and a preempted node's group resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.manifests import ExportRecord, JobStatusRecord, StageRecord
from common.storage import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.gmm_items=1024", "data.gmm_components=2", "clustering.num_experts=2",
         "clustering.num_fine_centroids=16", "training.global_batch=128", "training.duration_nimg=6400",
         "training.checkpoint_every_nimg=1280", "training.log_every_nimg=640",
         "router.training.duration_nimg=1280", "islands.assignment={0: island-a, 1: island-b}",
         "router.island=island-b", "prepare.num_workers=1"]


def _scenario(mode: str, run: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "tests/integration/island_scenario.py"), mode, str(run), *SMALL],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def _train_record(store: RunStore) -> StageRecord:
    return store.read_record("stages/train.json", StageRecord)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> tuple[dict, RunStore]:
    """One cluster run for both tests (it takes minutes): expert-00 trains on 2 labelled nodes, and one of
    its worker nodes is removed once a checkpoint is committed."""
    run = tmp_path_factory.mktemp("islands") / "run"
    return _scenario("preempt", run), RunStore(str(run))


def test_two_worker_island_lands_only_on_its_labelled_nodes(preempted) -> None:
    result, store = preempted
    nodes = _train_record(store).details["nodes"]
    # Both Ray Train workers of expert-00, before and after the preemption, on two distinct labelled nodes;
    # never the decoy that has the island-a resource but not the label, never the head (island-b).
    before = set(result["workers_before"].values())
    assert len(before) == 2 and before <= set(result["labelled"]), result
    assert len(nodes["expert-00"]) == 2 and set(nodes["expert-00"]) <= set(result["labelled"]), (nodes, result)
    assert nodes["expert-01"] == [result["head"]] and nodes["router"] == [result["head"]]
    status = store.read_record("experts/00/status.json", JobStatusRecord)
    assert status.state == "succeeded" and status.nimg == 6400  # progress from rank 0 reached the driver
    assert status.node in result["labelled"]  # the slot actor driving the group is on the island too
    assert any(k.startswith("tb/expert-00/events.out.tfevents") for k in store.list("tb/expert-00/"))


def test_preempted_node_resumes_the_group_on_the_remaining_labelled_nodes(preempted) -> None:
    result, store = preempted
    assert result["killed"], "no worker node of expert-00 was removed"
    nodes = _train_record(store).details["nodes"]["expert-00"]
    survivors = set(result["labelled"]) - {result["killed"]["node"]}
    assert len(nodes) == 2 and set(nodes) <= survivors, (nodes, result)  # regrouped on the remaining labelled nodes
    rows = [json.loads(line) for line in store.read_bytes("experts/00/metrics.jsonl").decode().splitlines() if line]
    seen = [row["nimg"] for row in rows]
    resumes = [row["resumed_from_nimg"] for row in rows if "resumed_from_nimg" in row]
    # The re-formed group resumed from a committed checkpoint (every 1,280 images), never from zero, and finished.
    assert resumes and all(r >= 1280 and r % 1280 == 0 for r in resumes), (resumes, seen)
    assert seen.count(seen[0]) == 1 and seen[-1] == 6400
    assert store.read_record("experts/00/export.json", ExportRecord).nimg == 6400
    # The other island never noticed.
    other = store.read_record("experts/01/status.json", JobStatusRecord)
    assert other.state == "succeeded" and other.attempts == 1 and other.retries == 0

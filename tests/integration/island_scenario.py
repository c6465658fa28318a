"""Multi-worker island scenarios, run in their own process (each owns a multi-node `ray.cluster_utils.Cluster`).

Nodes: the head carries island-b; three nodes labelled ddm.island=a carry island-a; one decoy node
carries the island-a resource but not the label, so only the label selector keeps workers off it.
island-a trains expert-00 with 2 Ray Train workers; island-b trains expert-01 and the router.

`labels`: a plain run. `preempt`: once expert-00 has committed a checkpoint, a node running one of its
Ray Train workers (not its slot actor) is removed without grace. Prints one JSON line (RESULT ...).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from common.config import resolve_config
from common.storage import RunStore
from orchestrator.pipeline import run_pipeline

ISLANDS = ("islands.pool=[{name: island-a, resources: {island-a: 1}, label_selector: {ddm.island: a}, num_workers: 2}, "
           "{name: island-b, resources: {island-b: 1}}]")


def main(mode: str, run_dir: str, overrides: list[str]) -> None:
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
    small = {"object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"island-b": 2.0}, "include_dashboard": False, "_system_config": system, **small})
    labelled = [cluster.add_node(num_cpus=1, resources={"island-a": 1.0}, labels={"ddm.island": "a"}, **small)
                for _ in range(3)]
    decoy = cluster.add_node(num_cpus=1, resources={"island-a": 1.0}, **small)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = resolve_config("gmm", overrides=[f"run_uri={run_dir}", ISLANDS, *overrides])
    store = RunStore(config.run_uri)
    killed: dict = {}
    seen_workers: dict = {}

    def preempt() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            try:
                progress = ray.get(ray.get_actor("island-a#0").progress.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - not started yet
                progress = {}
            workers = progress.get("worker_nodes", {})
            ckpts = [k for k in store.list("experts/00/checkpoints/") if k.endswith(".json")] \
                if store.exists("experts/00/checkpoints") else []
            if progress.get("job") == "expert-00" and len(workers) == 2 and ckpts:
                seen_workers.update(workers)
                target = next(n for n in labelled if n.node_id in workers.values() and n.node_id != progress["node"])
                killed.update(node=target.node_id, at_checkpoints=len(ckpts), slot_node=progress["node"])
                cluster.remove_node(target, allow_graceful=False)
                return
            time.sleep(0.3)

    thread = threading.Thread(target=preempt, daemon=True)
    if mode == "preempt":
        thread.start()
    summary = run_pipeline(config, until="train", show_progress=False)
    if thread.is_alive():
        thread.join(timeout=1)
    print("RESULT " + json.dumps({"killed": killed, "workers_before": seen_workers, "wall_s": summary.wall_s,
                                  "labelled": [n.node_id for n in labelled], "decoy": decoy.node_id,
                                  "head": cluster.head_node.node_id}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

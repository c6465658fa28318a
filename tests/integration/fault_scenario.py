"""Node-loss scenario, run in its own process (it owns a multi-node `ray.cluster_utils.Cluster`).

Three nodes, two island types: the head carries island-b, two workers carry island-a. Once expert-00
(island-a) has committed a checkpoint, the node running it is removed without grace. Prints one JSON
line with what happened; the test asserts on it and on the run store.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from common.config import resolve_config
from common.manifests import JobStatusRecord
from common.storage import RunStore
from orchestrator.pipeline import run_pipeline


def main(run_dir: str, overrides: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"island-b": 2.0}, "include_dashboard": False,
        "object_store_memory": 100 * 2**20,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    workers = [cluster.add_node(num_cpus=1, resources={"island-a": 1.0}, object_store_memory=100 * 2**20)
               for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = resolve_config("gmm", overrides=[f"run_uri={run_dir}", *overrides])
    store = RunStore(config.run_uri)
    killed: dict = {}

    def killer() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            ckpts = [k for k in store.list("experts/00/checkpoints/") if k.endswith(".json")] \
                if store.exists("experts/00/checkpoints") else []
            status = store.read_record("experts/00/status.json", JobStatusRecord) if store.exists("experts/00/status.json") else None
            if ckpts and status and status.node and status.state == "running":
                for node in workers:
                    if node.node_id == status.node:
                        killed.update(node=node.node_id, at_checkpoints=len(ckpts), t=time.time())
                        cluster.remove_node(node, allow_graceful=False)
                        return
            time.sleep(0.3)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_pipeline(config, until="train", show_progress=False)
    thread.join(timeout=1)
    print("RESULT " + json.dumps({"killed": killed, "wall_s": summary.wall_s,
                                  "worker_nodes": [n.node_id for n in workers]}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Multi-worker island scenarios, run in their own process (each owns a multi-node `ray.cluster_utils.Cluster`).

Nodes: the head carries island-b; three nodes labelled ddm.island=a carry island-a; one decoy node
carries the island-a resource but not the label, so only the label selector keeps workers off it.
island-a trains expert-00 with 2 Ray Train workers; island-b trains expert-01 and the router.

Prints one JSON line (RESULT ...).
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from common.config import resolve_config
from orchestrator.pipeline import run_pipeline

ISLANDS = ("islands.pool=[{name: island-a, resources: {island-a: 1}, label_selector: {ddm.island: a}, num_workers: 2}, "
           "{name: island-b, resources: {island-b: 1}}]")


def main(run_dir: str, overrides: list[str]) -> None:
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
    summary = run_pipeline(config, until="train", show_progress=False)
    print("RESULT " + json.dumps({"wall_s": summary.wall_s,
                                  "labelled": [n.node_id for n in labelled], "decoy": decoy.node_id,
                                  "head": cluster.head_node.node_id}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

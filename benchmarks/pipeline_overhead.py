"""Pipeline overhead: wall time of `ddm run` not spent encoding, clustering, training or sampling.

Runs the pipeline in this process (default: the embedded digits demo, fresh run store), then splits
its wall time using the run's own records: stage durations from `stages/*.json`, and each job's time
inside the training loop from its `metrics.jsonl` (images per log interval / measured img/s). Jobs
sharing an island run one after another, so the training critical path is the busiest island.

    python benchmarks/pipeline_overhead.py [--preset digits] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

from common.config import resolve_config
from common.keys import job_prefix
from common.manifests import StageRecord
from common.storage import RunStore


def loop_seconds(store: RunStore, prefix: str) -> float:
    rows = [json.loads(line) for line in store.read_bytes(f"{prefix}/metrics.jsonl").decode().splitlines() if line]
    seconds, previous = 0.0, 0
    for row in rows:
        seconds += (row["nimg"] - previous) / row["img_per_s"]
        previous = row["nimg"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="ddm-overhead-")
    config = resolve_config(args.preset, overrides=[f"run_uri={run_dir}/run", *args.overrides])

    from orchestrator.pipeline import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(config, show_progress=False)
    wall = time.perf_counter() - t0
    store = RunStore(config.run_uri)
    stages = {s: store.read_record(f"stages/{s}.json", StageRecord) for s in ("prepare", "cluster", "train", "gather")}
    placement = stages["train"].details["placement"]
    per_island: dict[str, float] = defaultdict(float)
    for job, island in placement.items():
        prefix = job_prefix(job)
        seconds = loop_seconds(store, prefix)
        per_island[island] += seconds
        print(f"  {job:<10} on {island:<9} {seconds:7.1f} s in the training loop")
    critical = max(per_island.values())
    work = stages["prepare"].duration_s + stages["cluster"].duration_s + critical + stages["gather"].duration_s
    print(f"wall {wall:.1f} s (pipeline reported {summary.wall_s:.1f} s)")
    for name, record in stages.items():
        print(f"  stage {name:<8} {record.duration_s:7.1f} s")
    print(f"  training critical path (busiest island) {critical:.1f} s; per island "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(per_island.items())))
    print(f"overhead (wall - prepare - cluster - training critical path - gather): {wall - work:.1f} s "
          f"= {(wall - work) / wall:.1%} of wall; inside the train stage: {stages['train'].duration_s - critical:.1f} s")


if __name__ == "__main__":
    main()

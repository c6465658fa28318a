"""Dynamic vs static placement: the train stage's wall time for 4 experts + router on unequal islands.

Two simulated islands on this machine, one expert slot each: `fast` trains a step as one micro-batch,
`slow` splits the same effective batch into 16 micro-batches (the same maths, many more kernel
launches: a slower island). The planner is told nothing about it (equal `speed`), so its plan splits
the experts evenly. Static: every job pinned to its planned island (the old behaviour). Dynamic:
`assignment: auto`, a pending job starts on the first free island, so `fast` takes the work planned
for `slow` once it is idle. Both runs are real `ddm run --until train` pipelines on local Ray.

    python benchmarks/placement_bench.py            # prints both wall times and the gain
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ISLANDS = ("islands.pool=[{name: fast, resources: {fast: 1}}, "
           "{name: slow, resources: {slow: 1}, per_worker_batch: 8}]")


def overrides(nimg: int) -> list[str]:
    return [ISLANDS, "data.gmm_items=2048", "clustering.num_experts=4", "clustering.num_fine_centroids=32",
            "training.global_batch=512", f"training.duration_nimg={nimg}", f"training.checkpoint_every_nimg={nimg}",
            f"training.log_every_nimg={nimg // 4}", "router.training.global_batch=128",
            f"router.training.duration_nimg={nimg // 4}", "prepare.num_workers=1"]


def train_wall(run: str, extra: list[str], nimg: int) -> tuple[float, dict]:
    from common.config import resolve_config
    from orchestrator.pipeline import run_pipeline

    config = resolve_config("gmm", overrides=[f"run_uri={run}", *overrides(nimg), *extra])
    summary = run_pipeline(config, until="train", show_progress=False)
    from common.manifests import StageRecord
    from common.storage import RunStore

    record = RunStore(run).read_record("stages/train.json", StageRecord)
    return summary.stages["train"]["duration_s"], record.details["placement"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nimg", type=int, default=16_384, help="images per expert")
    args = parser.parse_args()
    from common.config import resolve_config
    from orchestrator.islands import place_jobs

    plan = {p.job: p.island for p in place_jobs(resolve_config("gmm", overrides=overrides(args.nimg)))}
    pinned = "{" + ", ".join(f"{int(job[-2:])}: {island}" for job, island in plan.items() if job != "router") + "}"
    static_extra = [f"islands.assignment={pinned}", f"router.island={plan['router']}"]
    with tempfile.TemporaryDirectory(prefix="ddm-place-") as tmp:
        t_static, where_static = train_wall(f"{tmp}/static", static_extra, args.nimg)
        import ray

        ray.shutdown()  # a fresh local Ray for the second run, so neither inherits warm workers
        t_dynamic, where_dynamic = train_wall(f"{tmp}/dynamic", [], args.nimg)
    print(f"machine: {platform.node()} ({__import__('os').cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}")
    print(f"static  (planned islands pinned): train stage {t_static:6.1f} s  {where_static}")
    print(f"dynamic (first free island)     : train stage {t_dynamic:6.1f} s  {where_dynamic}")
    print(f"gain: {t_static - t_dynamic:.1f} s ({100 * (t_static - t_dynamic) / t_static:.0f}% of the static train stage)")


if __name__ == "__main__":
    main()

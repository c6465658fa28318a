"""Data parallelism inside one island: Ray Train's TorchTrainer runs `worker.train.train` on every worker.

gloo on CPU, NCCL on GPU (TorchTrainer's default backend for `use_gpu`). Each worker processes its
slice of every step's batch (see `worker.data.worker_positions`); DDP averages the gradients; rank 0
alone writes metrics, checkpoints and the export. The process group never leaves the island: one
TorchTrainer per expert, its workers pinned by the island's resources / label selector.
"""

from __future__ import annotations

from common.keys import export_key

import logging
from typing import Callable

from common.manifests import ExportRecord
from common.storage import RunStore
from worker.train import TrainJob, train

log = logging.getLogger(__name__)


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    on_progress = config["on_progress"] if rank == 0 else None
    train(config["job"], config["store"], on_progress=on_progress, device=ray.train.torch.get_device())


def train_distributed(job: TrainJob, store: RunStore, on_progress: Callable[[dict], None] | None = None,
                      scaling_resources: dict | None = None, run_name: str | None = None,
                      label_selector: dict[str, str] | None = None, storage_path: str | None = None) -> ExportRecord:
    """Train `job` on `job.num_workers` Ray Train workers; returns the export committed by rank 0.

    `on_progress` runs inside the rank-0 worker, so it must be picklable (e.g. it calls an actor).
    `scaling_resources` are each worker's resources (e.g. {"CPU": 1, "island-a": 1}).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "store": store, "on_progress": on_progress},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker=scaling_resources, label_selector=label_selector),
        # Retries belong to the orchestrator, which restarts from our own committed checkpoints.
        run_config=RunConfig(name=run_name or f"{job.name}@{job.island}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()
    record = store.read_record(export_key(job.prefix), ExportRecord)
    if record is None:
        raise RuntimeError(f"{job.name}@{job.island}: Ray Train finished but {job.prefix}/export.json is not committed")
    return record

"""Data parallelism inside one island: Ray Train's TorchTrainer runs `worker.train.train` on every worker.

gloo on CPU, NCCL on GPU (TorchTrainer's default backend for `use_gpu`). Each worker processes its
slice of every step's batch (see `worker.data.worker_positions`); DDP averages the gradients; rank 0
alone writes metrics, checkpoints and the export. The process group never leaves the island: one
TorchTrainer per expert, every worker pinned by the island's resources and label selector.

Every rank calls `ray.train.report` at each log or checkpoint point (it is collective): rank 0's row
is the metrics, and a committed run-store checkpoint is reported as a small pointer directory, so the
dashboard's Train tab shows each expert's curve and checkpoints without copying weights. A worker
lost mid-run (its node preempted) makes Ray Train restart the group on the island's remaining
matching nodes, up to `max_failures` times; `train` resumes from the last committed checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

from common.keys import export_key
from common.manifests import ExportRecord
from common.storage import RunStore
from worker.train import TrainJob, train

log = logging.getLogger(__name__)


def _worker_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    sink = config["progress_sink"]  # an actor handle (picklable), never a bound method of one
    if sink is not None:
        sink.worker_started.remote(rank, ray.get_runtime_context().get_node_id())
    on_progress = (lambda row: sink.report.remote(row)) if sink is not None and rank == 0 else None
    store: RunStore = config["store"]

    def on_report(row: dict, checkpoint_key: str | None) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if checkpoint_key is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ddm-ckpt-") as folder:
            with open(os.path.join(folder, "ddm_checkpoint.json"), "w") as handle:
                json.dump({"run_store": store.url, "record": checkpoint_key}, handle)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    train(config["job"], store, on_progress=on_progress, device=ray.train.torch.get_device(), on_report=on_report)


def train_distributed(job: TrainJob, store: RunStore, progress_sink: Any = None,
                      scaling_resources: dict | None = None, run_name: str | None = None,
                      label_selector: dict[str, str] | None = None, accelerator_type: str | None = None,
                      storage_path: str | None = None, max_failures: int = 3) -> ExportRecord:
    """Train `job` on `job.num_workers` Ray Train workers; returns the export committed by rank 0.

    `progress_sink` is an actor handle with `report(row)` and `worker_started(rank, node_id)` methods
    (the island's slot actor). `scaling_resources` are each worker's resources (e.g. {"CPU": 1,
    "island-a": 1}); `label_selector` and `accelerator_type` pin every worker to the island's nodes.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = dict(scaling_resources or {"CPU": 1})
    # One Ray Train run per (run store, job): Ray Train keeps per-name state under storage_path.
    run_id = hashlib.sha1(store.url.encode()).hexdigest()[:8]
    use_gpu = bool(job.use_gpu or resources.pop("GPU", 0))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "store": store, "progress_sink": progress_sink},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     label_selector=label_selector, accelerator_type=accelerator_type),
        run_config=RunConfig(name=f"{run_name or f'{job.name}@{job.island}'}-{run_id}", storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # A group that cannot be re-formed (too few matching nodes left) fails after
                             # `max_failures` start timeouts instead of waiting forever: the orchestrator's
                             # retry then starts a fresh attempt from the last committed checkpoint.
                             failure_config=FailureConfig(max_failures=max_failures,
                                                          controller_failure_limit=max_failures)),
    )
    trainer.fit()
    record = store.read_record(export_key(job.prefix), ExportRecord)
    if record is None:
        raise RuntimeError(f"{job.name}@{job.island}: Ray Train finished but {job.prefix}/export.json is not committed")
    return record

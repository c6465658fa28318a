"""The pipeline: prepare -> cluster -> train (experts x K + router) -> gather, on a Ray driver.

Every stage is idempotent (stages.py), so rerunning the same command after any crash resumes.
Local mode starts a Ray instance sized to this machine whose single node carries every island's
custom resources, so the same scheduling path runs as on a cluster.
"""

from __future__ import annotations

from common.errors import UsageError

import io
import logging
import os
import time
from dataclasses import dataclass, field
import ray

from common.config import RunConfig
from common.manifests import StageResult
from common.storage import RunStore
from orchestrator.islands import local_node_resources
from orchestrator.progress import ProgressView
from orchestrator.ray_group import RayWorkerGroup
from orchestrator.stages import STAGES, StageRunner
from orchestrator.train_stage import job_scope, run_train_stage

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_uri: str
    stages: dict[str, dict] = field(default_factory=dict)  # name -> {"skipped", "duration_s", "counts"}
    wall_s: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    dashboard_url: str | None = None


def connect_ray(config: RunConfig, address: str | None) -> tuple[bool, str | None]:
    """Connect to a cluster (address / RAY_ADDRESS) or start a local instance. Returns (local, dashboard)."""
    if ray.is_initialized():
        return False, None
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        context = ray.init(address=address, runtime_env=env, log_to_driver=False)
        return False, context.dashboard_url
    num_cpus = os.cpu_count() or 1
    resources = local_node_resources(config, num_cpus) if config.islands.simulate else {}
    # Dashboard on loopback only; Ray's token authentication is left as Ray configures it.
    context = ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env,
                       _temp_dir=f"/tmp/ddm-ray-{os.getuid()}")
    return True, context.dashboard_url


def run_pipeline(config: RunConfig, until: str = "gather", address: str | None = None,
                 show_progress: bool = True) -> RunSummary:
    if until not in STAGES:
        raise UsageError(f"until = {until!r}: expected one of {', '.join(STAGES)}")
    t0 = time.perf_counter()
    store = RunStore(config.run_uri, config.storage)
    runner = StageRunner(store, config)
    runner.write_run_record()
    summary = RunSummary(run_uri=store.url)
    view = ProgressView(enabled=show_progress)
    ray_mode: dict[str, bool] = {}  # Ray starts only when a stage that uses it has work to do

    def stage(name: str, fn, uses_ray: bool) -> None:
        if uses_ray and not ray_mode and runner.committed(name) is None:
            ray_mode["local"], summary.dashboard_url = connect_ray(config, address)
            if summary.dashboard_url:
                view.note(f"Ray dashboard: http://{summary.dashboard_url}")
        view.stage_started(name)
        outcome = runner.run(name, fn)
        summary.stages[name] = {"skipped": outcome.skipped, "duration_s": outcome.record.duration_s,
                                "counts": outcome.record.counts}
        view.stage_done(name, outcome.skipped, outcome.record.duration_s, outcome.record.counts)

    from worker.partition import cluster_data
    from worker.prepare import prepare_data

    stage("prepare", lambda: prepare_data(config, store), uses_ray=True)  # parallel encoding
    if until != "prepare":
        stage("cluster", lambda: cluster_data(config, store), uses_ray=False)
    if until in ("train", "gather"):
        islands = {i.name: i for i in config.islands.pool}

        def make_group(jobs: dict) -> RayWorkerGroup:
            return RayWorkerGroup(store, jobs, {name: job_scope(name) for name in jobs}, islands,
                                  use_labels=not ray_mode["local"])

        partial = runner.committed("train")
        if partial is not None and partial.details.get("missing"):
            runner.invalidate_from("train")  # retry the experts that failed; finished ones keep their exports
        if ray.is_initialized():
            warn_unplaceable_islands(config)
        stage("train", lambda: run_train_stage(config, store, runner.fingerprints["train"], make_group,
                                               listener=view.job_changed, on_tick=view.refresh), uses_ray=True)
    if until == "gather":
        stage("gather", lambda: gather_and_preview(config, store, runner), uses_ray=False)
        summary.outputs = {"ensemble": f"{store.url}/ensemble.json",
                           "samples": f"{store.url}/{preview_key(config)}"}
    summary.wall_s = time.perf_counter() - t0
    view.close()
    return summary


def preview_key(config: RunConfig) -> str:
    """Where gather's sample grid goes, named by the strategy that drew it."""
    return f"samples/ensemble_{config.sampling.strategy}.png"


def warn_unplaceable_islands(config: RunConfig) -> None:
    """Jobs of an island no node can host wait (an autoscaler may add one): say so instead of hanging quietly."""
    available = ray.cluster_resources()
    for island in config.islands.pool:
        short = sorted(k for k, v in island.resources.items() if available.get(k, 0.0) < v * island.num_workers)
        if short:
            log.warning("island %s: no node offers %s yet; its jobs wait until one does", island.name, short)


def gather_and_preview(config: RunConfig, store: RunStore, runner: StageRunner) -> StageResult:
    """Gather the ensemble, then write one top-1 sample grid so every run ends with a picture."""
    from worker.ensemble import Ensemble
    from worker.gather import gather
    from worker.grid import make_grid

    train = runner.committed("train")
    missing = list(train.details.get("missing", [])) if train else []
    result = gather(config, store, allow_partial=config.islands.allow_partial, missing=missing)
    # The VAE that decodes the preview is the one this driver's own config named (latents.model), not one
    # read from an untrusted store, so it may live outside the run.
    ensemble = Ensemble.load(store, allow_external_models=True)
    n = min(config.sampling.num_samples, 64)
    classes = [i % ensemble.num_classes for i in range(n)] if ensemble.num_classes else None
    single = config.sampling.strategy == "single"
    latents = ensemble.sample(n, config.sampling, classes=classes, seed=config.seed,
                              expert=ensemble.present_ids[0] if single else None)
    grid = make_grid(ensemble.decode(latents), labels=[str(c) for c in classes] if classes else None,
                     title=f"{config.name}: {config.sampling.strategy}, cfg {config.sampling.cfg_scale}")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    store.write_bytes(preview_key(config), buffer.getvalue())
    return StageResult(counts=result.counts, outputs=result.outputs, details=result.details)

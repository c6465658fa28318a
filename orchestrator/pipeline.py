"""The pipeline: prepare -> cluster -> train (experts x K + router) -> gather, on a Ray driver
(orchestrator/ray_connect.py connects it).

Every stage is idempotent (stages.py), so rerunning the same command after any crash resumes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from common.config import RunConfig
from common.errors import UsageError
from common.keys import HIRES_ROOT
from common.manifests import RunRecord, StageResult
from common.storage import RunStore
from orchestrator.hires_stage import hires_store, run_hires_stage
from orchestrator.lease import LEASE_KEY, RunLease
from orchestrator.progress import ProgressView
from orchestrator.ray_connect import (
    CONNECT_TIMEOUT_S,
    check_durable_store,
    connect_ray,
    in_background,
    in_cluster_mode,
    start_ray_data_services,
)
from orchestrator.ray_group import RayWorkerGroup
from orchestrator.stages import StageDamaged, StageRunner, active_stages, code_version, now_iso
from orchestrator.train_stage import job_scope, run_train_stage

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_uri: str
    stages: dict[str, dict] = field(default_factory=dict)  # name -> {"skipped", "duration_s", "counts"}
    wall_s: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    dashboard_url: str | None = None


class NotARunStore(UsageError):
    """`--run` names a location that holds something other than a run store."""


def open_run_store(config: RunConfig) -> RunStore:
    """The run store at `config.run_uri`, created by writing its marker (run.json) first.

    Refuses an empty run_uri, and a non-empty location without run.json: a run never writes into (or
    clears) a folder it did not create.
    """
    if not config.run_uri.strip():
        raise UsageError("run_uri is empty: name the run store with --run DIR (a new location or an existing run)")
    store = RunStore(config.run_uri, config.storage)
    if store.exists("run.json"):
        store.read_record("run.json", RunRecord)  # a malformed marker is a one-line ManifestError
        return store
    foreign = [name for name in store.top_level() if name != LEASE_KEY]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise NotARunStore(f"{store.url}: not a DDM run store (no run.json) and not empty ({shown}); "
                           f"choose a new or empty location with --run")
    marker = RunRecord(name=config.name, config=config.model_dump(mode="json"),
                       config_fingerprint=config.fingerprint(), code_version=code_version(), created_at=now_iso())
    store.create_exclusive("run.json", marker.model_dump_json(indent=2).encode())  # lost race: the other's marker
    return store


def run_pipeline(config: RunConfig, until: str = "gather", address: str | None = None,
                 show_progress: bool = True, redo: str | None = None, allow_local_store: bool = False,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> RunSummary:
    """Run the stages up to `until` under the run store's lease; `redo` names the one stage whose
    committed outputs (and later stages') may be removed and rebuilt."""
    stages = active_stages(config)
    if until not in stages:
        unset = " (hires is not configured: set hires.image_size)" if until == "hires" else ""
        raise UsageError(f"until = {until!r}: expected one of {', '.join(stages)}{unset}")
    if redo is not None and (redo not in stages or stages.index(redo) > stages.index(until)):
        raise UsageError(f"--redo {redo}: expected one of {', '.join(stages[:stages.index(until) + 1])} "
                         f"(a stage this run reaches)")
    check_durable_store(config.run_uri, in_cluster_mode(address), allow_local_store)
    t0 = time.perf_counter()
    store = open_run_store(config)
    with RunLease(store, config.storage.lease_ttl_s) as lease:
        return _drive(config, store, lease, until, address, show_progress, redo, t0, connect_timeout_s)


def _drive(config: RunConfig, store: RunStore, lease: RunLease, until: str, address: str | None,
           show_progress: bool, redo: str | None, t0: float,
           connect_timeout_s: float = CONNECT_TIMEOUT_S) -> RunSummary:
    from worker.listing import (
        hash_walk,
        is_builtin,
        list_source,
        read_committed_listing,
        read_hash_cache,
        update_hash_cache,
        walk_source,
    )

    previous = None if is_builtin(config.data) else read_committed_listing(store, config.data)
    hint = (read_hash_cache(store, config.data) or previous) if previous else None
    summary = RunSummary(run_uri=store.url)
    view = ProgressView(enabled=show_progress)
    ray_mode: dict[str, bool] = {}  # Ray starts only when a stage that uses it has work to do

    def start_ray() -> None:
        ray_mode["local"], summary.dashboard_url = connect_ray(config, address, connect_timeout_s)
        if summary.dashboard_url:
            view.note(f"Ray dashboard: http://{summary.dashboard_url}")

    if is_builtin(config.data) or ray.is_initialized() or (store.exists("stages/prepare.json") and redo != "prepare"):
        listing = list_source(config.data, config.storage, hint)  # missing/empty source: one line, nothing touched
    else:  # prepare will run, on Ray: Ray's processes start while this process hashes the source
        walk = walk_source(config.data, config.storage)  # missing/empty source: one line, before Ray starts
        hashed = in_background(lambda: hash_walk(config.data, walk, hint), name="ddm-listing")
        start_ray()
        start_ray_data_services()  # its service actors start before prepare's encoder actors, not beside them
        listing = hashed()
        del walk, hashed  # the walk's per-file table: not held through the stages
    if hint is not None:
        update_hash_cache(store, listing, hint)
    runner = StageRunner(store, config, None if is_builtin(config.data) else listing.fingerprint(), redo=redo,
                         source_changes=listing.changes_since(previous) if previous else "")
    runner.check(until)  # a changed committed stage stops here, before anything is written
    check_committed_outputs(runner, until)
    runner.write_run_record()

    def stage(name: str, fn, uses_ray: bool) -> None:
        lease.check()
        if uses_ray and not ray_mode and (runner.committed(name) is None or runner.redo == name):
            start_ray()
        view.stage_started(name)
        outcome = runner.run(name, fn)
        summary.stages[name] = {"skipped": outcome.skipped, "duration_s": outcome.record.duration_s,
                                "counts": outcome.record.counts}
        view.stage_done(name, outcome.skipped, outcome.record.duration_s, outcome.record.counts)

    from worker.partition import cluster_data

    reached = runner.stages[:runner.stages.index(until) + 1]
    stage("prepare", lambda: prepare_and_list(config, store, listing), uses_ray=True)  # parallel encoding
    if "cluster" in reached:
        stage("cluster", lambda: cluster_data(config, store), uses_ray=False)
    if "train" in reached:
        islands = {i.name: i for i in config.islands.pool}

        def groups_on(target: RunStore) -> Callable[[dict], RayWorkerGroup]:
            """Worker groups for a training stage whose jobs live in `target` (the run, or hires/)."""
            return lambda jobs: RayWorkerGroup(target, jobs, {name: job_scope(name) for name in jobs}, islands,
                                               use_labels=not ray_mode["local"])

        recover_training_stage(runner, "train")
        if ray.is_initialized():
            warn_unplaceable_islands(config)

        def tick() -> None:
            lease.check()
            view.refresh()

        stage("train", lambda: run_train_stage(config, store, runner.fingerprints["train"], groups_on(store),
                                               listener=view.job_changed, on_tick=tick,
                                               inputs=runner.inputs["train"]), uses_ray=True)
    if "hires" in reached:
        recover_training_stage(runner, "hires")
        hires_groups = groups_on(hires_store(store))
        stage("hires", lambda: run_hires_stage(config, store, runner.fingerprints["hires"], hires_groups,
                                               None if is_builtin(config.data) else listing.fingerprint(),
                                               listener=view.job_changed, on_tick=tick,
                                               inputs=runner.inputs["hires"]), uses_ray=True)
    if until == "gather":
        if runner.committed("gather") is not None and not runner.redoes("gather") and not gather_intact(store, config):
            log.warning("ensemble.json or its preview is missing or damaged; gathering again")
            runner.invalidate_from("gather", force=True)
        stage("gather", lambda: gather_and_preview(config, store, runner), uses_ray=False)
        summary.outputs = {"ensemble": f"{store.url}/ensemble.json",
                           "samples": f"{store.url}/{preview_key(config)}"}
    summary.wall_s = time.perf_counter() - t0
    view.close()
    return summary


def prepare_and_list(config: RunConfig, store: RunStore, listing) -> StageResult:
    """The prepare stage, then its source listing committed beside the dataset (data/listing.jsonl)."""
    from worker.listing import commit_listing, is_builtin
    from worker.prepare import prepare_data

    if is_builtin(config.data):
        return prepare_data(config, store)
    result = prepare_data(config, store, listing.fingerprint(), listing.sizes())  # discovery reuses the listing
    ref = commit_listing(store, listing)
    result = result.model_copy(update={
        "outputs": [*result.outputs, ref],
        "details": {**result.details, "source_listing": {"fingerprint": listing.fingerprint(), "items": len(listing.items),
                                                         "seconds": listing.seconds}}})
    return result


def check_committed_outputs(runner: StageRunner, until: str) -> None:
    """Committed data and clusters must still be there (one listing, sizes): redoing them would redo
    every later stage, so damage there stops the run with one line instead of a silent rebuild."""
    sizes: dict[str, int] | None = None
    for name in ("prepare", "cluster")[: 1 if until == "prepare" else 2]:
        record = runner.committed(name)
        if record is None or runner.redoes(name):
            continue
        sizes = runner.store.sizes() if sizes is None else sizes
        bad = [ref.path for ref in record.outputs if sizes.get(ref.path) != ref.size]
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            raise StageDamaged(f"stage {name}: committed outputs missing or resized: {shown}. Nothing was deleted. "
                               f"`ddm verify {runner.store.url}` lists every damaged key; `ddm run --redo {name}` "
                               f"rebuilds them (and redoes every later stage)")


def recover_training_stage(runner: StageRunner, stage: str) -> None:
    """Before a training stage (train, hires) runs or is skipped: a committed one with failed jobs is retried
    (finished jobs keep their exports); otherwise its exports are verified, committed or not (a repair of
    train un-commits hires), because its jobs count an export as done without reading it."""
    record = runner.committed(stage)
    if record is not None and record.details.get("missing"):
        runner.invalidate_from(stage, force=True)
    elif not runner.redoes(stage):
        repair_exports(runner, stage)


def repair_exports(runner: StageRunner, stage: str = "train") -> None:
    """A committed training stage (train, hires) whose exports fail verification is redone for those jobs
    only: each re-exports from its last good checkpoint (or retrains if it has none); later stages follow,
    and nothing else they committed is removed (a continuation keeps its own copy of what it started from)."""
    from common.keys import ROUTER, expert_index, job_prefix
    from orchestrator.verify import damaged_exports, drop_export

    record = runner.committed(stage)
    root = HIRES_ROOT if stage == "hires" else ""
    store = hires_store(runner.store) if root else runner.store
    missing = set(record.details.get("missing", [])) if record else set()
    expected = [job_prefix(job) for job in (record.details.get("placement", {}) if record else {})
                if job == ROUTER or expert_index(job) not in missing]
    damaged = damaged_exports(store, expected)
    if not damaged:
        return
    for prefix, reason in damaged.items():
        log.warning("%s%s: export fails verification (%s); re-exporting it from its last good checkpoint",
                    root, prefix, reason)
        drop_export(store, prefix)
    runner.invalidate_from(stage, force=True)


def gather_intact(store: RunStore, config: RunConfig) -> bool:
    from orchestrator.verify import ensemble_problems

    return not ensemble_problems(store) and store.exists(preview_key(config))


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

    last = runner.committed("hires" if config.hires is not None else "train")  # the stage whose exports gather uses
    missing = list(last.details.get("missing", [])) if last else []
    result = gather(config, store, allow_partial=config.islands.allow_partial, missing=missing,
                    root=HIRES_ROOT if config.hires is not None else "")
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

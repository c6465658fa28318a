"""The train stage: K isolated expert jobs and the router, driven by the controller on their islands."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable

from common.config import RunConfig
from common.errors import DDMError
from common.keys import ROUTER, expert_index, export_key, job_label, job_name, job_prefix, status_key
from common.manifests import ExportRecord, JobStatusRecord, StageResult
from common.storage import RunStore
from orchestrator.controller import ControllerResult, JobState, TrainController, WorkerGroup
from orchestrator.islands import place_jobs
from orchestrator.stages import StageChanged, now_iso, read_stamp

log = logging.getLogger(__name__)


class TrainFailed(DDMError, RuntimeError):
    """Raised when a job failed for good and the run does not allow a partial ensemble."""


def job_scope(name: str) -> tuple[list[str], list[str]]:
    """(read-write, read-only) prefixes of a job: its own prefix and its TensorBoard folder; the router
    also reads every expert's partition (training rows only: held-out rows are in none) and their
    cluster labels."""
    from worker.metrics import tensorboard_prefix

    if name == ROUTER:
        return ["router/", tensorboard_prefix(name) + "/"], ["experts/", "clusters/router/"]
    return [job_prefix(name) + "/", tensorboard_prefix(name) + "/"], []


def build_jobs(config: RunConfig, stage: str = "train") -> dict[str, dict]:
    """Every job's spec on every island that can run it: {job: {island: TrainJob}}.

    An island can run a job when its workers split the job's effective batch (TrainJob checks it);
    the spec differs per island only in how (micro-batch, workers, device), never in what is trained.
    A continuation stage's jobs (`stage` = hires) start from the export committed at `<prefix>/init.json`.
    """
    from pydantic import ValidationError

    from worker.train import expert_job, router_job

    names = [job_name(k) for k in range(config.clustering.num_experts)] + [ROUTER]
    jobs: dict[str, dict] = {name: {} for name in names}
    for island in config.islands.pool:
        for name in names:
            try:
                job = router_job(config, island) if name == ROUTER else expert_job(config, expert_index(name), island)
                jobs[name][island.name] = job if stage == "train" else job.model_copy(
                    update={"stage": stage, "init_key": init_key(job.prefix)})
            except ValidationError as exc:
                log.info("%s cannot run on island %s: %s", name, island.name, exc.errors()[0]["msg"])
    return jobs


def init_key(prefix: str) -> str:
    """A continuation job's starting weights: a copy of the previous stage's export, committed in its prefix."""
    return f"{prefix}/init.json"


def plan(config: RunConfig, jobs: dict[str, dict]) -> list:
    """The placement plan over the islands each job can run on (see islands.place_jobs)."""
    return place_jobs(config, eligible={name: list(specs) for name, specs in jobs.items()})


def reconcile_outputs(store: RunStore, names: list[str], fingerprint: str, inputs: dict | None = None) -> set[str]:
    """Stamp each job with the inputs its outputs are made from; return the jobs whose export is committed.

    Never deletes: a job stamped with other inputs stops the stage (the runner's check normally stops
    the run before; `--redo train` removes the old outputs first).
    """
    done = set()
    for name in names:
        prefix = job_prefix(name)
        stamp = read_stamp(store.read_bytes(f"{prefix}/job.json")) if store.exists(f"{prefix}/job.json") else None
        if stamp is None:
            stamp_raw = json.dumps({"fingerprint": fingerprint, "inputs": inputs or {}}, sort_keys=True, indent=1)
            store.write_bytes(f"{prefix}/job.json", stamp_raw.encode())
        elif stamp.get("fingerprint") != fingerprint:
            raise StageChanged(f"{prefix} holds training outputs made with other inputs. Nothing was deleted. "
                               f"Start a new run (--run elsewhere), or `ddm run --redo train`")
        if store.read_record(export_key(prefix), ExportRecord) is not None:
            done.add(name)
    return done


class StatusWriter:
    """Writes each job's `status.json` on state changes, and on progress at most every `every_s`."""

    def __init__(self, store: RunStore, jobs: dict, fingerprint: str, every_s: float = 5.0,
                 listener: Callable[[JobState], None] | None = None, stage: str = "train") -> None:
        self.store, self.jobs, self.fingerprint, self.every_s, self.stage = store, jobs, fingerprint, every_s, stage
        self.listener = listener
        self.last: dict[str, tuple[str, float]] = {}
        self.retries: dict[str, int] = {}
        self.islands: dict[str, str] = {}  # the island each job's images were last published under

    def __call__(self, state: JobState) -> None:
        from worker.metrics import count_retry, report_job_images

        label = job_label(state.name, self.stage)  # a later stage's jobs are told apart in views and metrics
        if self.listener is not None:
            self.listener(state if label == state.name else dataclasses.replace(state, name=label))
        if state.retries > self.retries.get(state.name, 0):
            count_retry(label, state.island)
            self.retries[state.name] = state.retries
        if "nimg" in state.progress:
            report_job_images(label, state.island, int(state.progress["nimg"]), self.islands.get(state.name))
            self.islands[state.name] = state.island
        # Write at once when the state or the node changes, else at most every `every_s`.
        key = f"{state.status.value}|{state.progress.get('node')}"
        previous = self.last.get(state.name)
        if previous and previous[0] == key and time.monotonic() - previous[1] < self.every_s:
            return
        self.last[state.name] = (key, time.monotonic())
        p = state.progress
        record = JobStatusRecord(
            job=state.name, island=state.island, state=state.status.value, attempts=state.attempts,
            retries=state.retries, nimg=int(p.get("nimg", 0)),
            duration_nimg=int(p.get("duration_nimg", next(iter(self.jobs[state.name].values())).training.duration_nimg)),
            loss=p.get("loss"), img_per_s=p.get("img_per_s"), eta_s=p.get("eta_s"), node=p.get("node"),
            last_error=state.last_error, fingerprint=self.fingerprint, updated_at=now_iso())
        self.store.write_bytes(status_key(job_prefix(state.name)), record.model_dump_json(indent=2).encode())


def run_train_stage(config: RunConfig, store: RunStore, fingerprint: str,
                    make_group: Callable[[dict], WorkerGroup],
                    listener: Callable[[JobState], None] | None = None,
                    on_tick: Callable[[], None] | None = None, inputs: dict | None = None,
                    stage: str = "train") -> StageResult:
    """Train every job of `stage` to its export, against `store` (the run, or a later stage's own root)."""
    jobs = build_jobs(config, stage)
    placements = plan(config, jobs)
    done = reconcile_outputs(store, list(jobs), fingerprint, inputs)
    capacity = {i.name: i.concurrency for i in config.islands.pool}
    status = StatusWriter(store, jobs, fingerprint, listener=listener, stage=stage)
    from worker.metrics import init_retries

    init_retries({job_label(p.job, stage): p.island for p in placements})
    group = make_group(jobs)
    controller = TrainController(placements, capacity, group, config.islands.max_retries,
                                 done=done, on_change=status)
    for name, state in controller.states.items():  # progress lines show the target before the first report
        state.progress["duration_nimg"] = next(iter(jobs[name].values())).training.duration_nimg
    result: ControllerResult = controller.run(poll_s=1.0, on_tick=on_tick)
    status.listener = None  # the view has seen every transition; only the records are refreshed
    for state in result.states.values():
        status.last.pop(state.name, None)
        status(state)  # final state of every job, unthrottled
    if ROUTER in result.failed:
        raise TrainFailed(f"router failed for good: {result.failed[ROUTER]}")
    if result.failed and not config.islands.allow_partial:
        names = ", ".join(f"{n} ({e})" for n, e in sorted(result.failed.items()))
        raise TrainFailed(f"experts failed for good: {names}; set islands.allow_partial=true to gather the rest")
    missing = sorted(expert_index(n) for n in result.failed)
    counts = {"experts": config.clustering.num_experts - len(missing), "skipped": len(done),
              "retries": sum(s.retries for s in result.states.values())}
    return StageResult(counts=counts, details={
        "missing": missing, "placement": {name: s.island for name, s in result.states.items()},
        "planned": {p.job: p.island for p in placements},
        "access": summarize_access(getattr(group, "outcomes", {})),
        "nodes": {job: outcome.get("nodes", []) for job, outcome in getattr(group, "outcomes", {}).items()},
        "retries": {n: s.retries for n, s in result.states.items()},
        "skipped_jobs": sorted(done)})


def summarize_access(outcomes: dict[str, dict]) -> dict[str, dict]:
    """Per job, the folders it read and wrote in the run store (recorded to prove isolation)."""
    out = {}
    for job, outcome in outcomes.items():
        log_ = outcome.get("access_log", [])
        out[job] = {mode: sorted({key.rsplit("/", 1)[0] for m, key in log_ if m == mode}) for mode in ("read", "write")}
        out[job]["process_group_left"] = bool(outcome.get("process_group_left"))
    return out


__all__ = ["run_train_stage", "job_scope", "build_jobs", "TrainFailed"]

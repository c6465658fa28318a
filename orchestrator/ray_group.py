"""The Ray implementation of `WorkerGroup`: one actor per island slot, running that slot's jobs in turn.

An island of concurrency C gets up to C slot actors, created on first use and reused for the next job
the controller starts there (a new Python process with torch costs seconds per job on a small node).
Each run receives only its job spec and a store view scoped to that job (docs/design.md §5); nothing
else crosses islands. A crashed attempt's actor is replaced, so a retry starts in a fresh process.
Progress reaches the driver through the slot actor: single-worker jobs train inside it; a multi-worker
job's rank 0 reports to it through its actor handle (`report`), never through a pickled bound method.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from common.config import IslandConfig, StorageConfig
from common.keys import job_label
from common.storage import RunStore
from orchestrator.controller import Crashed, Event, Finished, Progress
from orchestrator.islands import actor_options, worker_resources

log = logging.getLogger(__name__)


@ray.remote
class IslandSlot:
    """Runs one training job at a time on its island and answers progress queries (a threaded actor)."""

    def __init__(self, island_json: str, slot: int) -> None:
        self.island = IslandConfig.model_validate_json(island_json)
        self.slot = slot
        self.job_name: str | None = None
        self.node = ray.get_runtime_context().get_node_id()
        self.latest: dict[str, Any] = {}
        self.worker_nodes: dict[int, str] = {}

    def __repr__(self) -> str:  # the dashboard's and the logs' name for this actor while it trains a job
        return f"{self.job_name or 'idle'}@{self.island.name}#{self.slot}"

    def report(self, progress: dict) -> None:
        """Progress from the job's rank 0 (in this actor, or in a Ray Train worker through this handle)."""
        self.latest = {**self.latest, **progress}

    def worker_started(self, rank: int, node: str) -> None:
        self.worker_nodes[rank] = node
        self.latest = {**self.latest, "worker_nodes": dict(self.worker_nodes)}

    def run(self, job_json: str, store_url: str, storage: dict, read_write: list[str],
            read_only: list[str]) -> dict:
        from worker.train import TrainJob, job_store

        job = TrainJob.model_validate_json(job_json)
        self.job_name, self.worker_nodes = job_label(job.name, job.stage), {}
        self.latest = {"job": job.name, "node": self.node, "pid": os.getpid()}
        # Prefix-level view first, then narrowed to the exact files the job's manifest lists.
        view = RunStore(store_url, StorageConfig.model_validate(storage)).scoped(read_write, read_only)
        store = job_store(view, job)
        if job.num_workers > 1:
            from worker.distributed import train_distributed

            export = train_distributed(job, store, progress_sink=ray.get_runtime_context().current_actor,
                                       scaling_resources=worker_resources(self.island),
                                       label_selector=dict(self.island.label_selector) or None,
                                       accelerator_type=self.island.accelerator_type if job.use_gpu else None,
                                       run_name=f"{job_label(job.name, job.stage)}@{self.island.name}".replace("/", "-"))
            nodes = sorted(set(self.worker_nodes.values()))
        else:
            from worker.train import train

            export = train(job, store, on_progress=self.report)
            nodes = [self.node]
        import torch.distributed as dist

        self.job_name = None
        # Evidence for the isolation contract: what this job touched, where it ran, and that no process
        # group outlives it (multi-worker islands form theirs inside Ray Train, among their own workers).
        return {"nimg": export.nimg, "access_log": list(store.access_log), "nodes": nodes,
                "process_group_left": dist.is_available() and dist.is_initialized()}

    def progress(self) -> dict:
        return dict(self.latest)


@dataclass
class _Slot:
    actor: Any = None
    job: str | None = None  # the job it runs now
    ref: Any = None          # that run's ObjectRef


class RayWorkerGroup:
    """Starts jobs on island slot actors and turns their outcomes into controller events."""

    def __init__(self, store: RunStore, jobs: dict[str, dict[str, Any]], scopes: dict[str, tuple[list[str], list[str]]],
                 islands: dict[str, IslandConfig], use_labels: bool = True, progress_every_s: float = 2.0) -> None:
        self.store = store
        self.jobs = jobs          # name -> island -> TrainJob (the job's spec on that island)
        self.scopes = scopes      # name -> (read-write prefixes, read-only prefixes)
        self.islands = islands
        self.use_labels = use_labels  # False in local mode: one node cannot carry every island's labels
        self.progress_every_s = progress_every_s
        self.slots: dict[str, list[_Slot]] = {name: [] for name in islands}
        self.outcomes: dict[str, dict] = {}  # job name -> what its successful run returned
        self.actors_started = 0
        self._last_progress = 0.0

    def _free_slot(self, island: str) -> tuple[int, _Slot]:
        slots = self.slots[island]
        for index, slot in enumerate(slots):
            if slot.job is None:
                return index, slot
        slots.append(_Slot())
        return len(slots) - 1, slots[-1]

    def launch(self, job: str, island: str, attempt: int) -> None:
        spec, cfg = self.jobs[job][island], self.islands[island]
        index, slot = self._free_slot(island)
        if slot.actor is None:
            options = actor_options(cfg, f"{island}#{index}")
            if not self.use_labels:
                options.pop("label_selector", None)
            slot.actor = IslandSlot.options(**options).remote(cfg.model_dump_json(), index)
            self.actors_started += 1
        read_write, read_only = self.scopes[job]
        slot.job = job
        slot.ref = slot.actor.run.remote(spec.model_dump_json(), self.store.url, self.store.config.model_dump(),
                                         read_write, read_only)
        log.info("launched %s@%s#%d (attempt %d)", job, island, index, attempt)

    def _running(self) -> dict[Any, _Slot]:
        return {slot.ref: slot for slots in self.slots.values() for slot in slots if slot.job is not None}

    def poll(self, timeout_s: float) -> list[Event]:
        events: list[Event] = []
        running = self._running()
        if running:
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=timeout_s)
            for ref in ready:
                slot = running[ref]
                job, slot.job, slot.ref = slot.job, None, None
                try:
                    self.outcomes[job] = ray.get(ref)
                    # The final count, in case the last report landed after the last progress poll.
                    events.extend([Progress(job, {"nimg": self.outcomes[job]["nimg"]}), Finished(job)])
                except Exception as exc:  # noqa: BLE001 - any failure of an attempt is reported, not raised
                    events.append(Crashed(job, _one_line(exc)))
                    _kill(slot.actor)  # a retry starts in a fresh process (the node may be gone anyway)
                    slot.actor = None
        else:
            time.sleep(min(timeout_s, 0.2))
        if time.monotonic() - self._last_progress >= self.progress_every_s:
            self._last_progress = time.monotonic()
            events.extend(self._progress())
        return events

    def _progress(self) -> list[Event]:
        refs = {slot.actor.progress.remote(): slot.job for slot in self._running().values()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0) if refs else ([], [])
        events: list[Event] = []
        for ref in ready:
            try:
                progress = ray.get(ref)
            except Exception:  # noqa: BLE001 - a dying actor: its run() ref reports the failure
                continue
            if progress.get("job") == refs[ref]:  # not the previous job's last report
                events.append(Progress(refs[ref], progress))
        return events

    def shutdown(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                _kill(slot.actor)
                slot.actor, slot.job, slot.ref = None, None, None


def _kill(actor: Any) -> None:
    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already dead
            pass


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray wraps the remote traceback; its last line names the root cause.
    return (lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}")[:500]

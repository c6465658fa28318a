"""The Ray implementation of `WorkerGroup`: one named actor per job attempt, pinned to its island.

Each actor receives only its job spec and a store view scoped to that job (docs/design.md §5); nothing
else crosses islands. Actors report progress when asked; a dead actor or node surfaces as `Crashed`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray

from common.config import IslandConfig, StorageConfig
from common.storage import RunStore
from orchestrator.controller import Crashed, Event, Finished, Progress
from orchestrator.islands import actor_options, worker_resources

log = logging.getLogger(__name__)


@ray.remote
class IslandJob:
    """Runs one training job on its island and answers progress queries (a threaded actor)."""

    def __init__(self, job_json: str, store_url: str, storage: dict, read_write: list[str], read_only: list[str],
                 island_json: str) -> None:
        from worker.train import TrainJob, job_store

        self.job = TrainJob.model_validate_json(job_json)
        self.island = IslandConfig.model_validate_json(island_json)
        # Prefix-level view first, then narrowed to the exact files the job's manifest lists.
        view = RunStore(store_url, StorageConfig.model_validate(storage)).scoped(read_write, read_only)
        self.store = job_store(view, self.job)
        self.latest: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def _on_progress(self, progress: dict) -> None:
        # The training loop itself exports the Ray metrics; the actor only keeps the latest report.
        self.latest = {**self.latest, **progress}

    def run(self) -> dict:
        if self.job.num_workers > 1:
            from worker.distributed import train_distributed

            export = train_distributed(self.job, self.store, on_progress=self._on_progress,
                                       scaling_resources=worker_resources(self.island),
                                       run_name=f"{self.job.name}@{self.island.name}")
        else:
            from worker.train import train

            export = train(self.job, self.store, on_progress=self._on_progress)
        import torch.distributed as dist

        # Evidence for the isolation contract: what this job touched, and that no process group
        # outlives it (multi-worker islands form theirs inside Ray Train, among their own workers).
        return {"nimg": export.nimg, "access_log": list(self.store.access_log),
                "process_group_left": dist.is_available() and dist.is_initialized()}

    def progress(self) -> dict:
        return dict(self.latest)


class RayWorkerGroup:
    """Launches `IslandJob` actors and turns their outcomes into controller events."""

    def __init__(self, store: RunStore, jobs: dict[str, Any], scopes: dict[str, tuple[list[str], list[str]]],
                 islands: dict[str, IslandConfig], use_labels: bool = True, progress_every_s: float = 2.0) -> None:
        self.store = store
        self.jobs = jobs          # name -> TrainJob
        self.scopes = scopes      # name -> (read-write prefixes, read-only prefixes)
        self.islands = islands
        self.use_labels = use_labels  # False in local mode: one node cannot carry every island's labels
        self.progress_every_s = progress_every_s
        self.actors: dict[str, Any] = {}
        self.results: dict[Any, str] = {}   # run() ref -> job name
        self.outcomes: dict[str, dict] = {}  # job name -> what its successful run returned
        self._last_progress = 0.0

    def launch(self, job: str, island: str, attempt: int) -> None:
        spec, cfg = self.jobs[job], self.islands[island]
        read_write, read_only = self.scopes[job]
        options = actor_options(cfg, spec.name)
        if not self.use_labels:
            options.pop("label_selector", None)
        actor = IslandJob.options(**options).remote(
            spec.model_dump_json(), self.store.url, self.store.config.model_dump(), read_write, read_only,
            cfg.model_dump_json())
        self.actors[job] = actor
        self.results[actor.run.remote()] = job
        log.info("launched %s@%s (attempt %d)", job, island, attempt)

    def poll(self, timeout_s: float) -> list[Event]:
        events: list[Event] = []
        if self.results:
            ready, _ = ray.wait(list(self.results), num_returns=len(self.results), timeout=timeout_s)
            for ref in ready:
                job = self.results.pop(ref)
                try:
                    self.outcomes[job] = ray.get(ref)
                    events.append(Finished(job))
                except Exception as exc:  # noqa: BLE001 - any failure of an attempt is reported, not raised
                    events.append(Crashed(job, _one_line(exc)))
                self._release(job)
        else:
            time.sleep(min(timeout_s, 0.2))
        if time.monotonic() - self._last_progress >= self.progress_every_s:
            self._last_progress = time.monotonic()
            events.extend(self._progress())
        return events

    def _progress(self) -> list[Event]:
        refs = {actor.progress.remote(): job for job, actor in self.actors.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0) if refs else ([], [])
        events: list[Event] = []
        for ref in ready:
            try:
                events.append(Progress(refs[ref], ray.get(ref)))
            except Exception:  # noqa: BLE001 - a dying actor: its run() ref reports the failure
                pass
        return events

    def _release(self, job: str) -> None:
        actor = self.actors.pop(job, None)
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass

    def shutdown(self) -> None:
        for job in list(self.actors):
            self._release(job)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray wraps the remote traceback; its last line names the root cause.
    return (lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}")[:500]

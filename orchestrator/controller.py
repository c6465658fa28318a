"""The training controller: an explicit state machine over the train stage's jobs (Ray Train v2 style).

Workers only report events (progress, finished, crashed); the controller alone decides what happens
next (launch, retry from the last checkpoint, give up) and records each job's state. Placement is
dynamic: a pending job starts on the first of its eligible islands with a free slot (its planned
island first), so an island that finishes early takes pending work instead of idling. It knows nothing
about Ray: `WorkerGroup` is the seam, implemented for Ray in `ray_group.py` and faked in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from orchestrator.islands import Placement

log = logging.getLogger(__name__)


class JobStatus(str, Enum):
    PENDING = "pending"      # waiting for a free slot on one of its eligible islands
    RUNNING = "running"      # an attempt is live
    SUCCEEDED = "succeeded"  # export committed
    FAILED = "failed"        # out of retries


@dataclass
class JobState:
    name: str
    island: str  # the island of the current (or last) attempt; the planned one until it starts
    status: JobStatus = JobStatus.PENDING
    attempts: int = 0
    retries: int = 0
    last_error: str | None = None
    progress: dict = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in (JobStatus.SUCCEEDED, JobStatus.FAILED)


# ---- events: what workers report --------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    job: str
    progress: dict


@dataclass(frozen=True)
class Finished:
    job: str


@dataclass(frozen=True)
class Crashed:
    job: str
    error: str


Event = Progress | Finished | Crashed


# ---- decisions: what the controller does ------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    job: str
    island: str
    attempt: int  # 1 = first try; >1 = retry, resuming from the job's last committed checkpoint


@dataclass(frozen=True)
class GiveUp:
    job: str
    error: str


Decision = Launch | GiveUp


class WorkerGroup(Protocol):
    """Starts job attempts and reports what happens to them. Nothing else crosses this seam."""

    def launch(self, job: str, island: str, attempt: int) -> None: ...
    def poll(self, timeout_s: float) -> list[Event]: ...
    def shutdown(self) -> None: ...


@dataclass
class ControllerResult:
    succeeded: list[str]
    failed: dict[str, str]
    states: dict[str, JobState]


class TrainController:
    """Drives jobs to a terminal state. `step()` is one tick: apply events, then schedule."""

    def __init__(self, placements: list[Placement], capacity: dict[str, int], group: WorkerGroup,
                 max_retries: int, done: set[str] = frozenset(),
                 on_change: Callable[[JobState], None] | None = None) -> None:
        self.group = group
        self.capacity = dict(capacity)
        self.max_retries = max_retries
        self.on_change = on_change or (lambda state: None)
        # Longest expected job first: it gets the first free slot.
        order = sorted(placements, key=lambda p: (-p.expected_cost, p.job))
        self.placements = {p.job: p for p in order}
        self.states = {p.job: JobState(p.job, p.island) for p in order}
        for name in done:
            self.states[name].status = JobStatus.SUCCEEDED
        unknown = {i for p in placements for i in p.candidates} - set(capacity)
        if unknown:
            raise ValueError(f"jobs placed on islands without capacity: {sorted(unknown)}")

    @property
    def finished(self) -> bool:
        return all(s.terminal for s in self.states.values())

    def running_on(self, island: str) -> int:
        return sum(1 for s in self.states.values() if s.island == island and s.status == JobStatus.RUNNING)

    def step(self, timeout_s: float = 1.0) -> list[Decision]:
        decisions: list[Decision] = []
        for event in self.group.poll(timeout_s):
            decision = self._apply(event)
            if decision is not None:
                decisions.append(decision)
        decisions.extend(self._schedule())
        for decision in decisions:
            if isinstance(decision, Launch):
                self.group.launch(decision.job, decision.island, decision.attempt)
        return decisions

    def _apply(self, event: Event) -> Decision | None:
        state = self.states.get(event.job)
        if state is None or state.status != JobStatus.RUNNING:
            return None  # a late event from an attempt already handled
        if isinstance(event, Progress):
            state.progress = {**state.progress, **event.progress}
            self.on_change(state)
            return None
        if isinstance(event, Finished):
            state.status, state.finished_at = JobStatus.SUCCEEDED, time.time()
            self.on_change(state)
            return None
        state.last_error = event.error
        if state.retries >= self.max_retries:
            state.status, state.finished_at = JobStatus.FAILED, time.time()
            self.on_change(state)
            return GiveUp(state.name, event.error)
        # Retry from the last committed checkpoint (the job resumes by itself), on any node of its island.
        state.retries += 1
        state.status = JobStatus.PENDING
        log.warning("%s@%s failed (%s); retry %d/%d from its last checkpoint", state.name, state.island,
                    event.error, state.retries, self.max_retries)
        self.on_change(state)
        return None

    def _schedule(self) -> list[Decision]:
        decisions: list[Decision] = []
        free = {island: slots - self.running_on(island) for island, slots in self.capacity.items()}
        for state in self.states.values():
            if state.status != JobStatus.PENDING:
                continue
            island = next((i for i in self.placements[state.name].candidates if free[i] > 0), None)
            if island is None:
                continue  # every island it may run on is busy: it waits for the first slot to free up
            free[island] -= 1
            if island != state.island:
                log.info("%s: planned for %s, starts on %s (first free slot)", state.name, state.island, island)
            state.island = island
            state.status, state.attempts = JobStatus.RUNNING, state.attempts + 1
            state.started_at = state.started_at or time.time()
            self.on_change(state)
            decisions.append(Launch(state.name, state.island, state.attempts))
        return decisions

    def run(self, poll_s: float = 1.0, on_tick: Callable[[], None] | None = None) -> ControllerResult:
        try:
            while not self.finished:
                self.step(poll_s)
                if on_tick is not None:
                    on_tick()
        finally:
            self.group.shutdown()
        return self.result()

    def result(self) -> ControllerResult:
        return ControllerResult(
            succeeded=[n for n, s in self.states.items() if s.status == JobStatus.SUCCEEDED],
            failed={n: s.last_error or "failed" for n, s in self.states.items() if s.status == JobStatus.FAILED},
            states=self.states)

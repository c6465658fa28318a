"""The train controller stepped against a fake worker group, without Ray (Ray Train v2 style)."""

from __future__ import annotations

from orchestrator.controller import (Crashed, Finished, GiveUp, JobStatus, Launch, Progress, TrainController)
from orchestrator.islands import Placement


class FakeGroup:
    """Records launches; the test decides what each attempt reports."""

    def __init__(self) -> None:
        self.launched: list[tuple[str, str, int]] = []
        self.pending: list = []
        self.closed = False

    def launch(self, job: str, island: str, attempt: int) -> None:
        self.launched.append((job, island, attempt))

    def poll(self, timeout_s: float) -> list:
        events, self.pending = self.pending, []
        return events

    def shutdown(self) -> None:
        self.closed = True


def make(placements, capacity, retries=2, done=frozenset()):
    group = FakeGroup()
    changes = []
    ctl = TrainController(placements, capacity, group, retries, done=done, on_change=lambda s: changes.append((s.name, s.status)))
    return ctl, group, changes


P = [Placement("expert-00", "a", 10), Placement("expert-01", "a", 10), Placement("expert-02", "b", 10),
     Placement("router", "b", 30)]


def test_schedules_within_island_capacity_longest_first() -> None:
    ctl, group, _ = make(P, {"a": 1, "b": 1})
    decisions = ctl.step()
    assert decisions == [Launch("router", "b", 1), Launch("expert-00", "a", 1)]
    group.pending = [Finished("expert-00")]
    assert ctl.step() == [Launch("expert-01", "a", 1)]
    assert ctl.states["expert-02"].status == JobStatus.PENDING  # island b still busy with the router


def test_crash_is_retried_then_given_up() -> None:
    ctl, group, _ = make(P[:1], {"a": 1}, retries=1)
    ctl.step()
    group.pending = [Crashed("expert-00", "node died")]
    assert ctl.step() == [Launch("expert-00", "a", 2)]  # retry on the same island (any matching node)
    group.pending = [Crashed("expert-00", "node died again")]
    assert ctl.step() == [GiveUp("expert-00", "node died again")]
    assert ctl.finished and ctl.result().failed == {"expert-00": "node died again"}


def test_retry_leaves_other_jobs_untouched() -> None:
    ctl, group, _ = make(P, {"a": 2, "b": 2})
    ctl.step()
    before = {n: (s.attempts, s.status) for n, s in ctl.states.items()}
    group.pending = [Progress("expert-01", {"nimg": 50}), Crashed("expert-00", "killed")]
    assert ctl.step() == [Launch("expert-00", "a", 2)]
    for name in ("expert-01", "expert-02", "router"):
        assert (ctl.states[name].attempts, ctl.states[name].status) == before[name]
    assert ctl.states["expert-01"].progress == {"nimg": 50}


def test_already_done_jobs_are_not_launched_and_late_events_ignored() -> None:
    ctl, group, _ = make(P, {"a": 2, "b": 2}, done={"expert-00", "router"})
    assert {d.job for d in ctl.step()} == {"expert-01", "expert-02"}
    group.pending = [Finished("expert-00"), Crashed("router", "stale")]  # not running: ignored
    assert ctl.step() == []
    group.pending = [Finished("expert-01"), Finished("expert-02")]
    result = ctl.run(poll_s=0)
    assert sorted(result.succeeded) == ["expert-00", "expert-01", "expert-02", "router"] and group.closed


def test_unknown_island_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="without capacity"):
        make(P, {"a": 1})

"""The train controller stepped against a fake worker group, without Ray (Ray Train v2 style)."""

from __future__ import annotations

from orchestrator.controller import Crashed, Finished, GiveUp, JobStatus, Launch, Progress, TrainController
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


class TimedGroup(FakeGroup):
    """Each attempt finishes after cost / speed ticks of its island: a simulated clock, no sleeping."""

    def __init__(self, cost: dict[str, float], speed: dict[str, float]) -> None:
        super().__init__()
        self.cost, self.speed, self.now = cost, speed, 0
        self.ends: dict[str, float] = {}

    def launch(self, job: str, island: str, attempt: int) -> None:
        super().launch(job, island, attempt)
        self.ends[job] = self.now + self.cost[job] / self.speed[island]

    def poll(self, timeout_s: float) -> list:
        self.now += 1
        done = [job for job, end in self.ends.items() if end <= self.now]
        for job in done:
            del self.ends[job]
        return [Finished(job) for job in sorted(done)]


def _run_timed(placements, speed, capacity):
    group = TimedGroup({p.job: p.expected_cost for p in placements}, speed)
    ctl = TrainController(placements, capacity, group, max_retries=0)
    ctl.run(poll_s=0)
    return group, ctl


def test_fast_island_takes_pending_jobs_planned_for_a_slow_one() -> None:
    # The plan split four equal experts 2 / 2; island "slow" turns out 4x slower than "fast".
    speed = {"fast": 4.0, "slow": 1.0}
    dynamic = [Placement(f"expert-0{k}", island, 8, eligible=(island, other))
               for k, (island, other) in enumerate([("fast", "slow"), ("slow", "fast")] * 2)]
    group, ctl = _run_timed(dynamic, speed, {"fast": 1, "slow": 1})
    ran_on = {job: island for job, island, _ in group.launched}
    assert ran_on["expert-00"] == "fast" and ran_on["expert-01"] == "slow"
    # expert-03 was planned for the busy slow island: the fast one took it as soon as it was free.
    assert ran_on["expert-02"] == "fast" and ran_on["expert-03"] == "fast"
    assert {s.island for s in ctl.states.values()} == {"fast", "slow"}
    assert all(s.status == JobStatus.SUCCEEDED for s in ctl.states.values())
    dynamic_ticks = group.now

    static = [Placement(p.job, p.island, p.expected_cost) for p in dynamic]  # planned island only
    group, _ = _run_timed(static, speed, {"fast": 1, "slow": 1})
    assert {job: island for job, island, _ in group.launched} == {p.job: p.island for p in static}
    assert dynamic_ticks < group.now  # 8 vs 16 simulated ticks


def test_pinned_jobs_wait_for_their_island() -> None:
    placements = [Placement("expert-00", "slow", 8, eligible=("slow",), pinned=True),
                  Placement("expert-01", "slow", 8, eligible=("slow",), pinned=True),
                  Placement("expert-02", "fast", 2, eligible=("fast", "slow"))]
    group, _ = _run_timed(placements, {"fast": 4.0, "slow": 1.0}, {"fast": 1, "slow": 1})
    assert [(job, island) for job, island, _ in group.launched] == [
        ("expert-00", "slow"), ("expert-02", "fast"), ("expert-01", "slow")]  # never on the idle fast island


def test_a_gpu_island_packs_one_expert_per_slot() -> None:
    # An island of 4 GPUs with num_workers 1 has 4 slots: four pending experts start at once.
    placements = [Placement(f"expert-0{k}", "gpu4", 8, eligible=("gpu4",)) for k in range(5)]
    ctl, group, _ = make(placements, {"gpu4": 4})
    assert [d.job for d in ctl.step()] == ["expert-00", "expert-01", "expert-02", "expert-03"]
    assert ctl.running_on("gpu4") == 4 and ctl.states["expert-04"].status == JobStatus.PENDING

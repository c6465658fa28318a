"""The train stage around the controller, with a fake worker group: retries, failure, allow_partial."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import resolve_config
from common.manifests import JobStatusRecord
from common.storage import RunStore
from orchestrator.controller import Crashed, Finished
from orchestrator.train_stage import TrainFailed, run_train_stage


class DoomedGroup:
    """Every attempt of `doomed` crashes; every other job finishes on its first attempt."""

    def __init__(self, doomed: str) -> None:
        self.doomed, self.events, self.launches = doomed, [], []

    def launch(self, job: str, island: str, attempt: int) -> None:
        self.launches.append((job, attempt))
        self.events.append(Crashed(job, "node lost") if job == self.doomed else Finished(job))

    def poll(self, timeout_s: float) -> list:
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        pass


def _config(tmp_path: Path, *extra: str):
    return resolve_config("digits", overrides=[f"run_uri={tmp_path / 'run'}", "islands.max_retries=2", *extra])


def test_expert_failing_for_good_ends_the_run_naming_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    group = DoomedGroup("expert-01")
    with pytest.raises(TrainFailed, match=r"expert-01 \(node lost\).*allow_partial"):
        run_train_stage(config, RunStore(config.run_uri), "fp", lambda jobs: group)
    assert [a for j, a in group.launches if j == "expert-01"] == [1, 2, 3]  # first try + 2 retries
    assert all(a == 1 for j, a in group.launches if j != "expert-01")
    status = RunStore(config.run_uri).read_record("experts/01/status.json", JobStatusRecord)
    assert (status.state, status.retries, status.last_error) == ("failed", 2, "node lost")


def test_allow_partial_records_the_missing_expert(tmp_path: Path) -> None:
    config = _config(tmp_path, "islands.allow_partial=true")
    result = run_train_stage(config, RunStore(config.run_uri), "fp", lambda jobs: DoomedGroup("expert-02"))
    assert result.details["missing"] == [2] and result.counts["experts"] == 3


def test_router_failure_is_fatal_even_with_allow_partial(tmp_path: Path) -> None:
    config = _config(tmp_path, "islands.allow_partial=true")
    with pytest.raises(TrainFailed, match="router failed for good"):
        run_train_stage(config, RunStore(config.run_uri), "fp", lambda jobs: DoomedGroup("router"))

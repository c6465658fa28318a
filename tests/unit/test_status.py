"""`ddm status` from the run store alone: a job whose controller went silent is shown as stale."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from common.manifests import JobStatusRecord, RunRecord
from common.storage import RunStore
from orchestrator.status import collect_status, format_status


def _status(store: RunStore, prefix: str, state: str, age_s: float) -> None:
    when = (datetime.now(timezone.utc) - timedelta(seconds=age_s)).isoformat(timespec="seconds")
    store.write_bytes(f"{prefix}/manifest.json", b"{}")
    store.commit(f"{prefix}/status.json", JobStatusRecord(job=prefix, island="a", state=state, nimg=10,
                                                           duration_nimg=100, updated_at=when))


def test_silent_running_job_is_reported_stale(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    store.commit("run.json", RunRecord(name="t", config={}, config_fingerprint="f", code_version="x", created_at="now"))
    _status(store, "experts/00", "running", age_s=5)
    _status(store, "experts/01", "running", age_s=3600)
    jobs = {j["prefix"]: j for j in collect_status(store)["jobs"]}
    assert jobs["experts/00"]["state"] == "running"
    assert jobs["experts/01"]["state"] == "stale" and "rerun `ddm run`" in jobs["experts/01"]["last_error"]
    assert "driver gone?" in format_status(collect_status(store))

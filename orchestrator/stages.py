"""Idempotent stages: a committed `stages/<name>.json` with a matching fingerprint means done.

A stage that runs first clears the outputs of any earlier, uncommitted or stale attempt (and of the
stages downstream of it), then commits its record last. A crash mid-stage therefore leaves no record,
and rerunning redoes exactly the uncommitted work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from common.config import RunConfig
from common.manifests import RunRecord, StageRecord, StageResult
from common.storage import RunStore

log = logging.getLogger(__name__)

STAGES = ("prepare", "cluster", "train", "gather")
# What each stage writes. A stage function clears its own outputs before writing (so it can be rerun
# on its own); the runner clears only the outputs of the stages after it, which its rerun makes stale.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data/",),
    "cluster": ("clusters/",),  # + each expert's partition, which cluster_data clears with its manifests
    # The job folders (checkpoints, exports). Never cleared when train itself reruns: it resumes, and
    # clears a job whose inputs changed (train_stage.reconcile_outputs).
    "train": ("experts/", "router/"),
    "gather": ("ensemble.json",),
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """git commit of the code when available (a working dir shipped to Ray may not be a checkout)."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddm-islands")
    except PackageNotFoundError:
        return "unknown"


def chain(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def stage_fingerprints(config: RunConfig) -> dict[str, str]:
    """Each stage's input fingerprint: its config sections plus its upstream stage's fingerprint.
    Prepare's also covers the source's file listing, so replaced or added files redo it."""
    from worker.prepare import prepare_fingerprint

    prepare = prepare_fingerprint(config)
    cluster = chain(prepare, config.fingerprint("clustering"))
    train = chain(cluster, config.fingerprint("model", "training", "router"))
    gather = chain(train, config.fingerprint("sampling"))
    return {"prepare": prepare, "cluster": cluster, "train": train, "gather": gather}


@dataclass
class StageOutcome:
    record: StageRecord
    skipped: bool


class StageRunner:
    """Runs stages against one run store, skipping those already committed with the same inputs."""

    def __init__(self, store: RunStore, config: RunConfig) -> None:
        self.store = store
        self.config = config
        self.fingerprints = stage_fingerprints(config)

    def write_run_record(self) -> None:
        existing = self.store.read_record("run.json", RunRecord)
        record = RunRecord(name=self.config.name, config=self.config.model_dump(mode="json"),
                           config_fingerprint=self.config.fingerprint(), code_version=code_version(),
                           created_at=existing.created_at if existing else now_iso())
        self.store.commit("run.json", record)

    def committed(self, stage: str) -> StageRecord | None:
        """The stage's record if it is committed for the current inputs, else None."""
        record = self.store.read_record(f"stages/{stage}.json", StageRecord)
        if record is not None and record.fingerprint == self.fingerprints[stage]:
            return record
        return None

    def run(self, stage: str, fn: Callable[[], StageResult]) -> StageOutcome:
        done = self.committed(stage)
        if done is not None:
            log.info("stage %s: committed %s, skipped", stage, done.finished_at)
            return StageOutcome(done, skipped=True)
        self.invalidate_from(stage)
        started, t0 = now_iso(), time.perf_counter()
        result = fn()
        record = StageRecord(stage=stage, fingerprint=self.fingerprints[stage], started_at=started,
                             finished_at=now_iso(), duration_s=round(time.perf_counter() - t0, 3),
                             counts=result.counts, outputs=result.outputs, details=result.details)
        self.store.commit(f"stages/{stage}.json", record)
        return StageOutcome(record, skipped=False)

    def invalidate_from(self, stage: str) -> None:
        """Remove the records of `stage` and everything downstream, and the downstream stages' outputs."""
        first = STAGES.index(stage)
        for i, later in enumerate(STAGES[first:], start=first):
            self.store.delete(f"stages/{later}.json")
            for prefix in STAGE_OUTPUTS[later] if i > first else ():
                self.store.delete(prefix.rstrip("/"))


def stage_summary(store: RunStore) -> dict[str, dict]:
    """Committed stage records as plain dicts (for `ddm status`)."""
    out = {}
    for stage in STAGES:
        record = store.read_record(f"stages/{stage}.json", StageRecord)
        if record is not None:
            out[stage] = json.loads(record.model_dump_json())
    return out

"""Idempotent stages: a committed `stages/<name>.json` with a matching fingerprint means done.

A stage that runs first clears the outputs of any earlier, uncommitted attempt (and of the stages
downstream of it), then commits its record last. A crash mid-stage therefore leaves no record, and
rerunning redoes exactly the uncommitted work. A committed stage whose inputs changed is never redone
silently: the run stops with one line (StageChanged) until the user starts a new run or asks for
`ddm run --redo STAGE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common.config import RunConfig
from common.errors import DDMError, UsageError
from common.keys import HIRES_ROOT
from common.manifests import RunRecord, StageRecord, StageResult
from common.storage import RunStore

log = logging.getLogger(__name__)

STAGES = ("prepare", "cluster", "train", "hires", "gather")  # hires only when configured (active_stages)
# What each stage writes. A stage function clears its own outputs before writing (so it can be rerun
# on its own); the runner clears the outputs of the stages after it, which its rerun makes stale, and
# only when no later stage is committed or the user asked for exactly that (`ddm run --redo STAGE`).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data/",),
    "cluster": ("clusters/",),  # + each expert's partition, which cluster_data clears with its manifests
    # The job folders (checkpoints, exports). Never cleared when train itself reruns: it resumes.
    "train": ("experts/", "router/"),
    "hires": (HIRES_ROOT,),  # a run store of the base layout (orchestrator/hires_stage.py); its jobs resume
    "gather": ("ensemble.json",),
}
# What a training job writes under its prefix (experts/<k>, router); `--redo train` removes these.
JOB_OUTPUTS = ("checkpoints", "export", "export.json", "metrics.jsonl", "samples", "status.json", "job.json")

# Training stages: rerunning one resumes every job from its own commits, so the pipeline's repairs
# (`invalidate_from(..., force=True)`) drop their records but never their outputs.
RESUMABLE = ("train", "hires")

# The config that changes each stage's output: the one table of stage inputs. A stage's fingerprint
# covers these values (and its upstream stage's fingerprint); `NOT_INPUTS` are settings that change how
# a stage runs, never what it produces (logging, checkpoint cadence and retention, worker counts,
# batch sizes of the encoders, devices, compile), so changing them never redoes a stage.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", "data", "features", "latents", "text"),
    "cluster": ("seed", "clustering"),
    "train": ("seed", "model", "training", "router"),
    "hires": ("hires",),
    "gather": ("seed", "sampling"),
}
_RUN_ONLY = ("compile", "keep_checkpoints", "log_every_nimg", "checkpoint_every_nimg", "sample_every_nimg",
             "data_workers")
NOT_INPUTS = frozenset(
    ["features.batch_size", "features.device", "latents.batch_size", "latents.device",
     "clustering.assign_chunk_rows", "clustering.device", "router.island"]
    + [f"training.{k}" for k in _RUN_ONLY] + [f"router.training.{k}" for k in _RUN_ONLY])
SOURCE_CONTENT = "data.source (content)"  # replaces data.source for file sources: content, not location


class StageChanged(UsageError):
    """A committed stage's inputs changed: the user decides (new run, or `--redo STAGE`). Exit 2."""


class StageDamaged(DDMError):
    """A committed stage's outputs are missing or altered and cannot be redone without redoing later work."""


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


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def active_stages(config: RunConfig) -> tuple[str, ...]:
    """The stages this run has: every stage, less hires when it is not configured (so a run without it
    fingerprints and resumes exactly as before the stage existed)."""
    return tuple(s for s in STAGES if s != "hires" or config.hires is not None)


def stage_inputs(config: RunConfig, source_fingerprint: str | None = None) -> dict[str, dict]:
    """Per stage, the flat {config path: value} that changes its output (see STAGE_INPUTS).

    For a file source, `data.source` (a location) is replaced by the content fingerprint of the source
    listing (worker/listing.py): moving or re-timestamping the files changes nothing, editing them does.
    """
    data = config.model_dump(mode="json")
    out = {}
    for stage in active_stages(config):
        sections = STAGE_INPUTS[stage]
        flat = _flatten({s: data[s] for s in sections})
        flat = {k: v for k, v in flat.items() if k not in NOT_INPUTS}
        if stage == "prepare" and source_fingerprint is not None:
            flat.pop("data.source", None)
            flat[SOURCE_CONTENT] = source_fingerprint
        out[stage] = flat
    return out


def _chained(upstream: str, inputs: dict) -> str:
    return hashlib.sha256((upstream + "|" + json.dumps(inputs, sort_keys=True)).encode()).hexdigest()


def stage_fingerprints(inputs: dict[str, dict]) -> dict[str, str]:
    """Each stage's fingerprint: its inputs plus its upstream stage's fingerprint (a chain), over the
    stages `inputs` names (in pipeline order)."""
    out, upstream = {}, ""
    for stage in [s for s in STAGES if s in inputs]:
        upstream = out[stage] = _chained(upstream, inputs[stage])
    return out


_MISSING = object()


def field_default(config: RunConfig, path: str) -> object:
    """The schema default (as JSON) of the config field at a flat `path`, or _MISSING."""
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    *parents, name = path.split(".")
    node: object = config
    for part in parents:
        node = getattr(node, part, _MISSING)
        if not isinstance(node, BaseModel):
            return _MISSING
    field = type(node).model_fields.get(name)
    if field is None:
        return _MISSING
    return to_jsonable_python(field.get_default(call_default_factory=True))


def same_inputs(old: dict, new: dict, config: RunConfig) -> bool:
    """Whether inputs recorded by an older version equal today's: a key the record lacks is a config
    field added since, which counts as unchanged while it holds its default (new fields are added with
    the default that keeps the old behaviour). A key that disappeared is a change."""
    if not old.keys() <= new.keys():
        return False
    return all(old[k] == v if k in old else field_default(config, k) == v for k, v in new.items())


def describe_change(old: dict | None, new: dict, limit: int = 3) -> str:
    """'training.lr 0.0001 -> 0.0005, ...' for the inputs that differ; old records lack the inputs."""
    if not old:
        return "its inputs (recorded before input tracking; compare run.json)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not keys:
        return "an upstream stage"
    shown = []
    for k in keys[:limit]:
        a, b = old.get(k, "unset"), new.get(k, "unset")
        shown.append(k if k == SOURCE_CONTENT else f"{k} {json.dumps(a)} -> {json.dumps(b)}")
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class StageOutcome:
    record: StageRecord
    skipped: bool


class StageRunner:
    """Runs stages against one run store, skipping those already committed with the same inputs.

    Nothing committed is deleted unless the user asked for it: `check()` stops the run (StageChanged)
    when a committed stage's inputs differ, and `redo` names the one stage whose outputs (and whose
    later stages' outputs) may be removed.
    """

    def __init__(self, store: RunStore, config: RunConfig, source_fingerprint: str | None = None,
                 redo: str | None = None, source_changes: str = "") -> None:
        self.stages = active_stages(config)
        if redo is not None and redo not in self.stages:
            raise UsageError(f"--redo {redo}: expected one of {', '.join(self.stages)}")
        self.store = store
        self.config = config
        self.redo = redo
        self.source_changes = source_changes  # e.g. "1 added (x.png)", for the StageChanged line
        self.inputs = stage_inputs(config, source_fingerprint)
        self.fingerprints = stage_fingerprints(self.inputs)
        self._adopt_records_from_older_versions()

    def _adopt_records_from_older_versions(self) -> None:
        """A stage committed (or a job stamped) before a config field existed keeps matching.

        When a recorded fingerprint differs from ours but the record is self-consistent (its inputs and
        our upstream hash to it) and its inputs equal ours up to fields added since at their defaults,
        this run adopts the recorded inputs and fingerprint for that stage: upgrading the code never
        stops or redoes committed work."""
        upstream = ""
        for stage in self.stages:
            ours = _chained(upstream, self.inputs[stage])
            record = self.store.read_record(f"stages/{stage}.json", StageRecord)
            found = [(record.fingerprint, record.details.get("inputs"))] if record is not None else []
            if stage == "train" and record is None:
                found = [(stamp.get("fingerprint"), stamp.get("inputs")) for stamp in job_stamps(self.store).values()]
            for fingerprint, inputs in found:
                if (fingerprint != ours and isinstance(inputs, dict) and _chained(upstream, inputs) == fingerprint
                        and same_inputs(inputs, self.inputs[stage], self.config)):
                    log.info("stage %s: record from an older version matches (new fields at their defaults)", stage)
                    ours, self.inputs[stage] = fingerprint, inputs
                    break
            self.fingerprints[stage] = upstream = ours

    def write_run_record(self) -> None:
        existing = self.store.read_record("run.json", RunRecord)
        record = RunRecord(name=self.config.name, config=self.config.model_dump(mode="json"),
                           config_fingerprint=self.config.fingerprint(), code_version=code_version(),
                           created_at=existing.created_at if existing else now_iso())
        self.store.commit("run.json", record)

    def redoes(self, stage: str) -> bool:
        """Whether `--redo` covers `stage` (the named stage and every stage after it)."""
        return self.redo is not None and self.stages.index(stage) >= self.stages.index(self.redo)

    def check(self, until: str = STAGES[-1]) -> None:
        """Stop (StageChanged, one line) at the first committed stage whose inputs changed, unless redone.

        Training jobs that checkpointed before the train stage committed are checked too (their job.json
        stamps): a killed run whose training config then changed must not lose its checkpoints.
        """
        for stage in self.stages[:self.stages.index(until) + 1]:  # stages this run does not reach are not touched
            if self.redoes(stage):
                return
            record = self.store.read_record(f"stages/{stage}.json", StageRecord)
            if record is not None and record.fingerprint != self.fingerprints[stage]:
                raise self.changed(stage, describe_change(record.details.get("inputs"), self.inputs[stage]))
            if stage in ("train", "hires") and record is None:
                for prefix, stamp in self.stamps(stage).items():
                    if stamp.get("fingerprint") != self.fingerprints[stage]:
                        what = describe_change(stamp.get("inputs"), self.inputs[stage])
                        raise self.changed(stage, f"{what}; {prefix} holds checkpoints made with the old inputs")

    def stamps(self, stage: str) -> dict[str, dict]:
        """The job stamps of a training stage (train: the run's jobs; hires: those under hires/)."""
        if stage == "hires":
            return {HIRES_ROOT + p: stamp for p, stamp in job_stamps(self.store.child(HIRES_ROOT)).items()}
        return job_stamps(self.store)

    def changed(self, stage: str, what: str) -> StageChanged:
        if stage == "prepare" and self.source_changes:
            what = what.replace(SOURCE_CONTENT, f"data.source content ({self.source_changes})")
        return StageChanged(
            f"stage {stage} is committed but its inputs changed: {what}. Nothing was deleted. Start a new run "
            f"(--run elsewhere), or redo it here with `ddm run --redo {stage}` (removes the outputs of "
            f"{stage} and every later stage)")

    def committed(self, stage: str) -> StageRecord | None:
        """The stage's record if it is committed for the current inputs, else None."""
        record = self.store.read_record(f"stages/{stage}.json", StageRecord)
        if record is not None and record.fingerprint == self.fingerprints[stage]:
            return record
        return None

    def run(self, stage: str, fn: Callable[[], StageResult]) -> StageOutcome:
        done = self.committed(stage)
        if done is not None and self.redo != stage:
            log.info("stage %s: committed %s, skipped", stage, done.finished_at)
            return StageOutcome(done, skipped=True)
        if self.redo == stage:
            self.clear_own_outputs(stage)
        self.invalidate_from(stage)
        started, t0 = now_iso(), time.perf_counter()
        result = fn()
        details = dict(result.details, inputs=self.inputs[stage])
        record = StageRecord(stage=stage, fingerprint=self.fingerprints[stage], started_at=started,
                             finished_at=now_iso(), duration_s=round(time.perf_counter() - t0, 3),
                             counts=result.counts, outputs=result.outputs, details=details)
        self.store.commit(f"stages/{stage}.json", record)
        return StageOutcome(record, skipped=False)

    def clear_own_outputs(self, stage: str) -> None:
        """`--redo STAGE`: its record first (nobody trusts the rest), then what it wrote."""
        self.store.delete(f"stages/{stage}.json")
        if stage == "train":  # the job outputs, not the experts' partitions (the cluster stage's)
            for prefix in job_prefixes(self.store):
                for item in JOB_OUTPUTS:
                    self.store.delete(f"{prefix}/{item}")
            self.store.delete("tb")  # the jobs' TensorBoard curves: they describe the training removed
        else:
            for prefix in STAGE_OUTPUTS[stage]:
                self.store.delete(prefix.rstrip("/"))

    def invalidate_from(self, stage: str, force: bool = False) -> None:
        """Remove the records of `stage` and everything downstream, and the downstream stages' outputs.

        Refuses (StageChanged) when a later stage still holds committed work that the user did not
        ask to redo: an uncommitted stage upstream of committed ones is a damaged store, not a rerun.
        `force` is for the pipeline's own repairs (a partial or damaged train stage regathers).
        """
        first = self.stages.index(stage)
        later = self.stages[first + 1:]
        kept = [s for s in later if self.store.exists(f"stages/{s}.json")]
        # Checkpoints of a later training stage stand in the way unless `stage` is itself a training stage
        # they were made on top of, with today's inputs (a repair rerunning train leaves hires to resume).
        kept += [f"{s} (checkpoints)" for s in RESUMABLE if s in later and any(
            stage not in RESUMABLE or stamp.get("fingerprint") != self.fingerprints[s]
            for stamp in self.stamps(s).values())]
        if kept and not force and not self.redoes(stage):
            raise StageChanged(
                f"stage {stage} has no committed record but later stages hold committed work "
                f"({', '.join(dict.fromkeys(kept))}). Nothing was deleted. Redo it with "
                f"`ddm run --redo {stage}` (removes the later stages' outputs), or start a new run")
        for i, name in enumerate(self.stages[first:], start=first):
            self.store.delete(f"stages/{name}.json")
            if name in RESUMABLE and (force or stage in RESUMABLE) and not self.redoes(stage):
                continue  # rerun after a repair or a rerun of train: its jobs resume from what they committed
            for prefix in STAGE_OUTPUTS[name] if i > first else ():
                self.store.delete(prefix.rstrip("/"))


def job_prefixes(store: RunStore) -> list[str]:
    """The training jobs' prefixes present in the store (experts/<k>, router)."""
    experts = sorted({"/".join(k.split("/")[:2]) for k in store.list("experts/") if k.count("/") >= 2})
    return experts + (["router"] if store.list("router/") else [])


def job_stamps(store: RunStore) -> dict[str, dict]:
    """prefix -> the stamp (fingerprint and inputs) of each job that has started training."""
    out = {}
    for prefix in job_prefixes(store):
        if store.exists(f"{prefix}/job.json"):
            out[prefix] = read_stamp(store.read_bytes(f"{prefix}/job.json"))
    return out


def read_stamp(raw: bytes) -> dict:
    """job.json: {"fingerprint", "inputs"}; older stores hold the bare fingerprint."""
    text = raw.decode().strip()
    return json.loads(text) if text.startswith("{") else {"fingerprint": text}


def stage_summary(store: RunStore) -> dict[str, dict]:
    """Committed stage records as plain dicts (for `ddm status`)."""
    out = {}
    for stage in STAGES:
        record = store.read_record(f"stages/{stage}.json", StageRecord)
        if record is not None:
            out[stage] = json.loads(record.model_dump_json())
    return out

"""`ddm status`: a run's state read from the run store alone (works with Ray down, from any machine)."""

from __future__ import annotations

from datetime import datetime, timezone

from common.errors import UsageError
from common.keys import HIRES_ROOT, export_key, status_key
from common.manifests import (
    CheckpointRecord,
    DatasetManifest,
    ExpertManifest,
    ExportRecord,
    FileRef,
    JobStatusRecord,
    ManifestError,
    RunRecord,
    StageRecord,
)
from common.storage import RunStore
from orchestrator.lease import read_lease
from orchestrator.stages import STAGES, stage_summary

STALE_AFTER_S = 120.0  # the controller writes each running job's status at least every ~5 s


def _jobs(store: RunStore, root: str = "") -> list[str]:
    """Training-job prefixes under `root` ("" for the base stage, "hires/" for the continuation)."""
    prefixes = sorted({"/".join(key.split("/")[:root.count("/") + 2]) for key in store.list(f"{root}experts/")
                       if key.count("/") >= root.count("/") + 2})
    return prefixes + ([f"{root}router"] if store.exists(f"{root}router/manifest.json") else [])


def last_checkpoint(store: RunStore, prefix: str) -> CheckpointRecord | None:
    keys = [k for k in store.list(f"{prefix}/checkpoints/") if k.endswith(".json") and k.count("/") == prefix.count("/") + 2]
    for key in sorted(keys, reverse=True):
        record = store.read_record(key, CheckpointRecord)
        if record is not None:
            return record
    return None


def collect_status(store: RunStore) -> dict:
    run = store.read_record("run.json", RunRecord)
    if run is None:
        raise UsageError(f"{store.url}: no run.json (not a DDM run store)")
    stages = stage_summary(store)
    sizes = store.sizes()  # one listing: what is reported as done must exist, with its recorded sizes
    jobs = []
    for root, prefix in [("", p) for p in _jobs(store)] + [(HIRES_ROOT, p) for p in _jobs(store, HIRES_ROOT)]:
        status = store.read_record(status_key(prefix), JobStatusRecord)
        try:
            export = store.read_record(export_key(prefix), ExportRecord)
            refs = [r.model_copy(update={"path": root + r.path}) for r in (export.weights, export.model_config_file)] \
                if export else []  # a stage's records name paths from its own root
            export_problem = _size_problems(sizes, refs)
        except ManifestError as exc:
            export, export_problem = None, [str(exc)]
        ckpt = last_checkpoint(store, prefix)
        entry = {"prefix": prefix, "state": status.state if status else ("succeeded" if export else "not started"),
                 "island": status.island if status else None, "attempts": status.attempts if status else 0,
                 "retries": status.retries if status else 0,
                 "nimg": export.nimg if export else (status.nimg if status else (ckpt.nimg if ckpt else 0)),
                 "duration_nimg": status.duration_nimg if status else None,
                 "tokens": int(export.final_metrics["tokens"]) if export and "tokens" in export.final_metrics else None,
                 # A committed export carries the final loss; the live status only the last one polled.
                 "loss": export.final_metrics.get("loss") if export else (status.loss if status else None),
                 "eta_s": status.eta_s if status else None,
                 "last_checkpoint_nimg": ckpt.nimg if ckpt else None,
                 "exported": export is not None and not export_problem, "damaged": export_problem,
                 "last_error": status.last_error if status else None,
                 "updated_at": status.updated_at if status else None}
        if export_problem:
            entry["state"] = "damaged"
            entry["last_error"] = (f"export damaged: {'; '.join(export_problem[:2])}; rerun `ddm run` to "
                                   f"re-export it from its last good checkpoint")
        elif entry["state"] == "succeeded":
            entry["eta_s"] = 0.0
        elif status is not None and entry["state"] in ("running", "pending") and not export:
            # A live controller rewrites status.json every few seconds; silence means it is gone.
            quiet_s = (datetime.now(timezone.utc) - datetime.fromisoformat(status.updated_at)).total_seconds()
            if quiet_s > STALE_AFTER_S:
                entry["state"] = "stale"
                entry["last_error"] = (f"no update for {quiet_s:.0f}s (driver gone?); rerun `ddm run` to resume "
                                       f"from the last checkpoint")
        jobs.append(entry)
    from orchestrator.verify import ensemble_problems

    stage_view = {}
    for name in STAGES:
        if name == "hires" and name not in stages and not run.config.get("hires"):
            continue  # a run without the continuation stage
        if name not in stages:
            stage_view[name] = {"done": False}
            continue
        outputs = StageRecord.model_validate(stages[name]).outputs
        stage_view[name] = {"done": True, **stages[name], "damaged": _size_problems(sizes, outputs)}
    ensemble = ensemble_problems(store, sizes) if store.exists("ensemble.json") else None
    return {"run": store.url, "name": run.name, "code_version": run.code_version, "created_at": run.created_at,
            "stages": stage_view, "jobs": jobs, "buckets": _bucket_rows(store),
            "ensemble": ensemble == [],
            "ensemble_damaged": ensemble or [], "driver": read_lease(store)}


def _bucket_rows(store: RunStore) -> list[dict]:
    """Per aspect-ratio bucket of a bucketed dataset: {bucket, latent_shape, rows, shards}; [] without buckets."""
    try:
        ds = store.read_record("data/dataset.json", DatasetManifest)
    except ManifestError:
        return []
    return list((ds.extra.get("buckets") if ds else None) or [])


def _size_problems(sizes: dict[str, int], refs) -> list[str]:
    return [f"{ref.path} {'missing' if ref.path not in sizes else f'is {sizes[ref.path]} B, recorded {ref.size} B'}"
            for ref in refs if sizes.get(ref.path) != ref.size]


def format_status(status: dict) -> str:
    lines = [f"run {status['name']} at {status['run']} (code {status['code_version']}, created {status['created_at']})",
             "stages:"]
    for name, stage in status["stages"].items():
        if stage["done"]:
            counts = ", ".join(f"{k}={v}" for k, v in stage.get("counts", {}).items())
            lines.append(f"  {name:<8} done     {stage['duration_s']:>8.1f}s  {counts}")
            if stage.get("damaged"):
                lines.append(f"      DAMAGED: {'; '.join(stage['damaged'][:3])} (ddm verify {status['run']})")
        else:
            lines.append(f"  {name:<8} pending")
    if status.get("buckets"):
        total = sum(b["rows"] for b in status["buckets"])
        lines.append("buckets (width x height: rows):")
        lines += [f"  {b['bucket'][0]:>5}x{b['bucket'][1]:<5} {b['rows']:>10,}  {b['rows'] / total:6.1%}  "
                  f"latent {'x'.join(map(str, b['latent_shape']))}" for b in status["buckets"]]
    if status["jobs"]:
        lines.append("jobs:")
        bucketed = bool(status.get("buckets"))  # images differ in tokens: show both (training.budget_unit)
        width = max(11, *(len(job["prefix"]) for job in status["jobs"]))
        lines.append(f"  {'job':<{width}} {'island':<10} {'state':<11} {'images seen':>21} "
                     + (f"{'tokens seen':>13} " if bucketed else "") + f"{'loss':>8} {'ckpt':>9} {'retries':>7} {'eta':>7}")
        for job in status["jobs"]:
            total = job["duration_nimg"]
            seen = f"{job['nimg']:,}" + (f"/{total:,}" if total else "")
            loss = f"{job['loss']:.4f}" if job["loss"] is not None else "-"
            ckpt = f"{job['last_checkpoint_nimg']:,}" if job["last_checkpoint_nimg"] is not None else "-"
            eta = f"{job['eta_s']:.0f}s" if job["eta_s"] is not None else "-"
            tokens = f"{job['tokens']:,}" if job["tokens"] is not None else "-"
            lines.append(f"  {job['prefix']:<{width}} {job['island'] or '-':<10} {job['state']:<11} {seen:>21} "
                         + (f"{tokens:>13} " if bucketed else "") + f"{loss:>8} {ckpt:>9} {job['retries']:>7} {eta:>7}")
            if job["last_error"] and job["state"] != "succeeded":
                lines.append(f"      last error: {job['last_error']}")
    if status["ensemble_damaged"]:
        lines.append(f"ensemble: DAMAGED ({'; '.join(status['ensemble_damaged'][:3])}); rerun `ddm run` to repair")
    else:
        lines.append(f"ensemble: {'gathered' if status['ensemble'] else 'not yet'}")
    if status.get("driver"):
        d = status["driver"]
        lines.append(f"driver: {d.get('host')} pid {d.get('pid')}, heartbeat {d.get('heartbeat_at')}, "
                     f"lease expires {d.get('expires_at')}")
    return "\n".join(lines)


# ---- traceability: which source files trained an expert ------------------------------------------------
def expert_files(store: RunStore, expert: int) -> list[str]:
    """Source keys (relative path, shard:member or builtin#i) of every row in expert `expert`'s partition:
    each partition row keeps its global `index`, which data/keys/<i>.jsonl maps to its source key."""
    import json

    import numpy as np
    from safetensors import safe_open

    manifest = store.read_record(f"experts/{expert:02d}/manifest.json", ExpertManifest)
    if manifest is None:
        raise UsageError(f"{store.url}/experts/{expert:02d}/manifest.json: not committed "
                         f"(no expert {expert}, or the cluster stage has not run)")
    ds = store.read_record("data/dataset.json", DatasetManifest)
    sidecars = (ds.extra.get("keys") if ds else None) or []
    bucketed = ds is not None and "buckets" in ds.extra  # one keys sidecar per listing range, several shards each
    if ds is None or (len(sidecars) != len(ds.shards) and not bucketed):
        raise UsageError(f"{store.url}/data/dataset.json: no per-row source keys (prepared by an older "
                         f"version); rerun the prepare stage")
    index = []
    for ref in manifest.shards:
        with safe_open(store.local_copy(ref), "np") as f:
            index.append(f.get_tensor("index"))
    rows = np.sort(np.concatenate(index)) if index else np.zeros(0, dtype=np.int64)
    starts = np.cumsum([0] + [s.rows for s in ds.shards])
    keys: list[str] = []
    if bucketed:
        wanted = set(rows.tolist())
        for sidecar in sidecars:
            keys += [e["key"] for e in map(json.loads, store.get_payload(FileRef(**sidecar)).decode().splitlines())
                     if e["index"] in wanted]
        return keys
    for i in np.unique(np.searchsorted(starts, rows, side="right") - 1):
        wanted = set(rows[(rows >= starts[i]) & (rows < starts[i + 1])].tolist())
        for line in store.get_payload(FileRef(**sidecars[i])).decode().splitlines():
            entry = json.loads(line)
            if entry["index"] in wanted:
                keys.append(entry["key"])
    return keys

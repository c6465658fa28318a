"""Check a run store against its records: every payload a record lists, by size (cheap: one listing)
or by sha256 (`ddm verify`: reads everything).

A payload is listed by the record that commits it: stage records, data/dataset.json, clusters.json,
each job's manifest, checkpoint records and export.json, ensemble.json. Repair is the next `ddm run`:
a damaged export is re-exported from the job's last good checkpoint (or the job retrains if it has
none), a damaged ensemble is gathered again; damaged data or clusters need `ddm run --redo STAGE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.keys import HIRES_ROOT
from common.manifests import (
    CheckpointRecord,
    ClusterManifest,
    DatasetManifest,
    EnsembleManifest,
    ExpertManifest,
    ExportRecord,
    FileRef,
    ManifestError,
    RouterManifest,
    StageRecord,
)
from common.storage import IntegrityError, RunStore, sha256_bytes
from orchestrator.stages import STAGES, job_prefixes

_CHECKPOINT = re.compile(r"^(.+)/checkpoints/\d{12}\.json$")


@dataclass
class Finding:
    key: str
    owner: str          # the record that lists it
    size: int
    problem: str = ""   # "" = ok; else "missing", "size 12 != 34", "sha256 ... != ..."

    @property
    def ok(self) -> bool:
        return not self.problem


def listed_payloads(store: RunStore, root: str = "") -> dict[str, tuple[str, FileRef]]:
    """Every payload any committed record lists: key -> (record key, FileRef). Unreadable records are
    reported as payload-less findings by `verify` (their key maps to a sentinel). `hires/` keeps the run
    layout with paths from its own root: its records are read there and their keys given from the run's."""
    out: dict[str, tuple[str, FileRef]] = {}

    def add(owner: str, refs) -> None:
        for ref in refs:
            if ref is not None:
                out.setdefault(root + ref.path, (root + owner, ref.model_copy(update={"path": root + ref.path})))

    for stage in STAGES if not root else ():
        record = _read(store, f"stages/{stage}.json", StageRecord)
        if record:
            add(f"stages/{stage}.json", record.outputs)
    ds = _read(store, "data/dataset.json", DatasetManifest)
    if ds:
        add("data/dataset.json", [*ds.shards, ds.quarantine])
    cl = _read(store, "clusters/clusters.json", ClusterManifest)
    if cl:
        add("clusters/clusters.json", [cl.centroids, *cl.assignments, cl.report, *cl.images])
    for prefix in job_prefixes(store):
        cls = RouterManifest if prefix == "router" else ExpertManifest
        manifest = _read(store, f"{prefix}/manifest.json", cls)
        if manifest:
            add(f"{prefix}/manifest.json", [*manifest.shards, *getattr(manifest, "assignments", [])])
    for key in store.list(""):
        if not root and key.startswith(HIRES_ROOT):
            continue  # read below, from its own root
        if _CHECKPOINT.match(key):
            record = _read(store, key, CheckpointRecord)
            if record:
                add(key, record.files)
        elif key.endswith(("/export.json", "/init.json")):
            record = _read(store, key, ExportRecord)
            if record:
                add(key, [record.weights, record.model_config_file])
    ens = _read(store, "ensemble.json", EnsembleManifest)
    if ens:
        members = [*ens.experts, *([ens.router] if ens.router else [])]
        add("ensemble.json", [ref for m in members for ref in (m.weights, m.model_config_file)] + [ens.centroids])
    if not root and store.list(HIRES_ROOT):
        out.update(listed_payloads(store.child(HIRES_ROOT), HIRES_ROOT))
    return out


def _read(store: RunStore, key: str, cls):
    try:
        return store.read_record(key, cls)
    except ManifestError:
        return None  # `verify` reports unreadable records separately


def unreadable_records(store: RunStore) -> list[Finding]:
    bad = []
    for key in store.list(""):
        cls = _record_class(key)
        if cls is None:
            continue
        try:
            store.read_record(key, cls)
        except ManifestError as exc:
            bad.append(Finding(key, key, 0, f"unreadable record: {exc}"))
    return bad


def _record_class(key: str):
    key = key.removeprefix(HIRES_ROOT)  # the continuation's records have the run's shapes
    if key.startswith("stages/") and key.endswith(".json"):
        return StageRecord
    if _CHECKPOINT.match(key):
        return CheckpointRecord
    if key.endswith(("/export.json", "/init.json")):
        return ExportRecord
    return {"data/dataset.json": DatasetManifest, "clusters/clusters.json": ClusterManifest,
            "ensemble.json": EnsembleManifest, "router/manifest.json": RouterManifest}.get(
        key, ExpertManifest if re.match(r"^experts/\d+/manifest\.json$", key) else None)


def verify(store: RunStore, full: bool = True) -> list[Finding]:
    """Every listed payload checked by size (one listing) and, when `full`, by sha256."""
    sizes = store.sizes()
    findings = unreadable_records(store)
    for key, (owner, ref) in sorted(listed_payloads(store).items()):
        finding = Finding(key, owner, ref.size)
        if key not in sizes:
            finding.problem = "missing"
        elif sizes[key] != ref.size:
            finding.problem = f"size {sizes[key]} != recorded {ref.size}"
        elif full:
            digest = sha256_bytes(store.read_bytes(key))
            if digest != ref.sha256:
                finding.problem = f"sha256 {digest[:12]}… != recorded {ref.sha256[:12]}…"
        findings.append(finding)
    return findings


def damaged_exports(store: RunStore, expected: list[str] = ()) -> dict[str, str]:
    """Jobs whose export.json is unreadable or whose export files fail sha256, and `expected` jobs
    (those a committed train stage lists as done) without one: prefix -> reason."""
    out = {}
    for prefix in sorted(set(job_prefixes(store)) | set(expected)):
        key = f"{prefix}/export.json"
        if not store.exists(key):
            if prefix in expected:
                out[prefix] = "export.json missing"
            continue
        try:
            record = store.read_record(key, ExportRecord)
            for ref in (record.weights, record.model_config_file):
                store.get_payload(ref)
        except FileNotFoundError:
            out[prefix] = "export file missing"
        except (IntegrityError, ManifestError) as exc:
            out[prefix] = str(exc)
    return out


def drop_export(store: RunStore, prefix: str) -> None:
    """Un-commit a damaged export: the record first, then its (damaged) files. Checkpoints stay."""
    store.delete(f"{prefix}/export.json")
    store.delete(f"{prefix}/export")


def ensemble_problems(store: RunStore, sizes: dict[str, int] | None = None) -> list[str]:
    """What is wrong with ensemble.json and the exports it lists (sizes only); [] when intact."""
    try:
        ens = store.read_record("ensemble.json", EnsembleManifest)
    except ManifestError as exc:
        return [str(exc)]
    if ens is None:
        return ["ensemble.json missing"]
    sizes = store.sizes() if sizes is None else sizes
    members = [*ens.experts, *([ens.router] if ens.router else [])]
    refs = [ref for m in members for ref in (m.weights, m.model_config_file)] + ([ens.centroids] if ens.centroids else [])
    return [f"{ref.path} {'missing' if ref.path not in sizes else f'size {sizes[ref.path]} != {ref.size}'}"
            for ref in refs if sizes.get(ref.path) != ref.size]


def format_findings(findings: list[Finding], show_ok: bool = True) -> str:
    lines = [f"{'ok ' if f.ok else 'BAD'} {f.key}  ({f.size:,} B, listed by {f.owner})"
             + ("" if f.ok else f": {f.problem}") for f in findings if show_ok or not f.ok]
    bad = sum(not f.ok for f in findings)
    lines.append(f"{len(findings) - bad} ok, {bad} damaged" + (
        "; `ddm run` with the same settings re-exports damaged exports from their last good checkpoint and "
        "regathers; damaged data or clusters need `ddm run --redo STAGE`; damaged checkpoints are skipped" if bad else ""))
    return "\n".join(lines)

"""The high-resolution continuation on local Ray: digits at 8x8, then every job continued at 16x16."""

from __future__ import annotations

import json
import shutil

import pytest

from common.config import resolve_config
from common.manifests import EnsembleManifest, ExpertManifest, ExportRecord, StageRecord
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline
from orchestrator.train_stage import build_jobs
from orchestrator.verify import verify
from tests.partitions import partition_indices
from worker.checkpoint import checkpoint_records
from worker.train import train

pytestmark = pytest.mark.ray

TINY = ["clustering.num_experts=2", "clustering.num_fine_centroids=16", "training.global_batch=64",
        "training.total_nimg=3200", "training.log_every_nimg=320", "training.checkpoint_every_nimg=320",
        "router.training.total_nimg=640", "sampling.num_samples=8", "sampling.steps=4", "prepare.num_workers=1",
        "hires.image_size=16", "hires.total_nimg=1280", "hires.router_nimg=640"]


@pytest.fixture(scope="module")
def hires_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("hires") / "run"
    config = resolve_config("digits", overrides=[f"run_uri={root}", *TINY])
    summary = run_pipeline(config, show_progress=False)
    return config, summary, RunStore(config.run_uri)


def test_hires_is_its_own_stage_and_the_ensemble_uses_its_exports(hires_run, capsys) -> None:
    config, summary, store = hires_run
    assert [s for s in summary.stages if not summary.stages[s]["skipped"]] == [
        "prepare", "cluster", "train", "hires", "gather"]
    record = store.read_record("stages/hires.json", StageRecord)
    assert record.details["latent_shape"] == [1, 16, 16] and record.details["inputs"]["hires.image_size"] == 16
    ensemble = store.read_record("ensemble.json", EnsembleManifest)
    assert ensemble.latent_shape == [1, 16, 16]
    assert all(m.weights.path.startswith("hires/experts/") for m in ensemble.experts)
    assert ensemble.router.weights.path.startswith("hires/router/")
    assert [f for f in verify(store) if not f.ok] == []  # hires records resolve from their own root
    assert main(["status", config.run_uri]) == 0
    out = capsys.readouterr().out
    assert "  hires    done" in out and "hires/experts/01" in out and "hires/router" in out


def test_hires_keeps_the_base_partition_and_holdout(hires_run) -> None:
    config, _, store = hires_run
    hires = store.child("hires")
    for k in range(2):
        base = store.read_record(f"experts/{k:02d}/manifest.json", ExpertManifest)
        high = hires.read_record(f"experts/{k:02d}/manifest.json", ExpertManifest)
        assert high.latent_shape == [1, 16, 16] and high.rows == base.rows
        assert partition_indices(hires, high) == partition_indices(store, base)  # the same rows, by listing position


def test_hires_jobs_start_from_base_exports_below_a_from_scratch_loss(hires_run, tmp_path) -> None:
    config, _, store = hires_run
    hires = store.child("hires")
    base = store.read_record("experts/00/export.json", ExportRecord)
    init = hires.read_record("experts/00/init.json", ExportRecord)
    assert init.weights.sha256 == base.weights.sha256 and init.weights.path.startswith("experts/00/init/")
    # The same job, data order and noise, from random weights: a copy of the partition in a store of its own.
    scratch_root = tmp_path / "scratch"
    shutil.copytree(config.run_uri + "/hires/experts/00/data", scratch_root / "experts/00/data")
    shutil.copy(config.run_uri + "/hires/experts/00/manifest.json", scratch_root / "experts/00/manifest.json")
    job = next(iter(build_jobs(config.hires_run_config(), "hires")["expert-00"].values()))
    train(job.model_copy(update={"init_key": None}), RunStore(str(scratch_root)))
    first = {name: json.loads(s.read_bytes("experts/00/metrics.jsonl").splitlines()[0])
             for name, s in (("continued", hires), ("scratch", RunStore(str(scratch_root))))}
    assert first["continued"]["nimg"] == first["scratch"]["nimg"] == 320
    assert first["continued"]["loss"] < 0.9 * first["scratch"]["loss"], first


def test_hires_resumes_from_its_checkpoints_without_retraining(hires_run) -> None:
    config, _, store = hires_run
    hires = store.child("hires")
    # A hires stage cut short: expert-01 lost its export and newest checkpoint; the stage is uncommitted.
    newest = checkpoint_records(hires, "experts/01")[-1]
    for key in ("ensemble.json", "stages/gather.json", "stages/hires.json"):
        store.delete(key)
    for key in ("experts/01/export.json", newest):
        hires.delete(key)
    summary = run_pipeline(config, show_progress=False)
    assert [s for s, v in summary.stages.items() if not v["skipped"]] == ["hires", "gather"]
    rows = [json.loads(line) for line in hires.read_bytes("experts/01/metrics.jsonl").splitlines()]
    assert rows[-1]["nimg"] == 640 and any(r.get("resumed_from_nimg") == 320 for r in rows)
    record = store.read_record("stages/hires.json", StageRecord)
    assert record.details["skipped_jobs"] == ["expert-00", "router"]
    assert record.details["prepare"]["resumed_shards"] == 1  # the prepared shard was kept


def test_damaged_exports_are_re_exported_without_removing_any_hires_work(hires_run) -> None:
    config, _, store = hires_run
    hires = store.child("hires")
    base = store.read_record("experts/01/export.json", ExportRecord)
    high = hires.read_record("experts/00/export.json", ExportRecord)
    for path in (f"{config.run_uri}/{base.weights.path}", f"{config.run_uri}/hires/{high.weights.path}"):
        with open(path, "r+b") as f:  # bit rot in a base export and in a hires export
            f.truncate(100)
    kept = {k for k in hires.list("") if "/checkpoints/" in k or "/init" in k or k.startswith("data/")}
    summary = run_pipeline(config, show_progress=False)
    assert [s for s, v in summary.stages.items() if not v["skipped"]] == ["train", "hires", "gather"]
    assert kept <= set(hires.list(""))  # nothing the continuation committed was removed
    redone = hires.read_record("experts/00/export.json", ExportRecord)
    assert redone.nimg == high.nimg and redone.weights.path != high.weights.path
    assert store.read_record("stages/hires.json", StageRecord).details["skipped_jobs"] == ["expert-01", "router"]
    assert [f for f in verify(store) if not f.ok] == []

"""The pipeline end to end on local Ray: stages, islands, isolation, idempotency, status, metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from common.config import resolve_config
from common.manifests import EnsembleManifest, JobStatusRecord, StageRecord
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline

pytestmark = pytest.mark.ray

TINY = ["data.gmm_items=1024", "data.gmm_components=2", "clustering.num_experts=2",
        "clustering.num_fine_centroids=16", "training.global_batch=128", "training.duration_nimg=2560",
        "training.checkpoint_every_nimg=1280", "training.log_every_nimg=640",
        "router.training.duration_nimg=1280", "router.training.checkpoint_every_nimg=1280",
        "sampling.num_samples=8", "sampling.steps=4", "prepare.num_workers=1"]


@pytest.fixture(scope="module")
def gmm_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "run"
    config = resolve_config("gmm", overrides=[f"run_uri={root}", *TINY])
    summary = run_pipeline(config, show_progress=False)
    return config, summary


def test_all_stages_commit_and_experts_spread_over_islands(gmm_run) -> None:
    config, summary = gmm_run
    store = RunStore(config.run_uri)
    assert [s for s in summary.stages if not summary.stages[s]["skipped"]] == ["prepare", "cluster", "train", "gather"]
    train = store.read_record("stages/train.json", StageRecord)
    assert set(train.details["placement"].values()) == {"island-a", "island-b"}
    ensemble = store.read_record("ensemble.json", EnsembleManifest)
    assert [m.expert for m in ensemble.experts] == [0, 1] and ensemble.router is not None
    assert store.exists("samples/ensemble_top1.png")
    for prefix in ("experts/00", "experts/01", "router"):
        status = store.read_record(f"{prefix}/status.json", JobStatusRecord)
        assert status.state == "succeeded" and status.attempts == 1


def test_isolation_each_expert_touched_only_its_own_prefix(gmm_run) -> None:
    config, _ = gmm_run
    access = RunStore(config.run_uri).read_record("stages/train.json", StageRecord).details["access"]
    for k in (0, 1):
        mine, tb = f"experts/{k:02d}", f"tb/expert-{k:02d}"  # its prefix and its own TensorBoard folder
        entry = access[f"expert-{k:02d}"]
        assert entry["read"] and all(d == mine or d.startswith(mine + "/") for d in entry["read"])
        assert all(d in (mine, tb) or d.startswith(mine + "/") for d in entry["write"]) and tb in entry["write"]
        assert not entry["process_group_left"]
    router = access["router"]
    # the router reads the experts' partitions (never their weights) and its cluster labels
    assert all(d.startswith("router") or re.match(r"^experts/\d+/data(/|$)", d) or d.startswith("clusters/router")
               for d in router["read"]), router["read"]
    assert all(d.startswith("router") or d == "tb/router" for d in router["write"])


def test_expert_reading_outside_its_view_fails_clearly(gmm_run) -> None:
    from common.storage import ScopeError
    from worker.train import expert_job, job_store

    config, _ = gmm_run
    view = job_store(RunStore(config.run_uri), expert_job(config, 0, config.islands.pool[0]))
    with pytest.raises(ScopeError, match="experts/01/manifest.json: read outside"):
        view.read_bytes("experts/01/manifest.json")


def test_rerun_does_no_work(gmm_run, monkeypatch) -> None:
    config, _ = gmm_run
    import worker.encoders as encoders

    calls_before = encoders.ENCODE_CALLS
    records = {s: RunStore(config.run_uri).read_bytes(f"stages/{s}.json") for s in ("prepare", "cluster", "train", "gather")}
    summary = run_pipeline(config, show_progress=False)
    assert all(info["skipped"] for info in summary.stages.values())
    assert encoders.ENCODE_CALLS == calls_before
    assert {s: RunStore(config.run_uri).read_bytes(f"stages/{s}.json") for s in records} == records


def test_changed_training_config_redoes_only_training_when_asked(gmm_run, tmp_path) -> None:
    import shutil

    from orchestrator.stages import StageChanged

    config, _ = gmm_run
    copy = tmp_path / "copy"
    shutil.copytree(config.run_uri, copy)
    changed = resolve_config("gmm", overrides=[f"run_uri={copy}", *TINY, "training.lr=5e-4"])
    with pytest.raises(StageChanged, match=r"stage train .*training.lr 0.001 -> 0.0005"):
        run_pipeline(changed, until="train", show_progress=False)  # never a silent retrain
    summary = run_pipeline(changed, until="train", show_progress=False, redo="train")
    assert summary.stages["prepare"]["skipped"] and summary.stages["cluster"]["skipped"]
    assert not summary.stages["train"]["skipped"]


def test_ddm_status_reads_the_store_alone(gmm_run, capsys) -> None:
    config, _ = gmm_run
    assert main(["status", config.run_uri, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert all(status["stages"][s]["done"] for s in ("prepare", "cluster", "train", "gather"))
    assert status["stages"]["prepare"]["counts"]["used"] == 1024
    jobs = {j["prefix"]: j for j in status["jobs"]}
    assert set(jobs) == {"experts/00", "experts/01", "router"}
    assert all(j["state"] == "succeeded" and j["exported"] and j["last_checkpoint_nimg"] for j in jobs.values())
    assert main(["status", config.run_uri]) == 0
    text = capsys.readouterr().out
    assert "experts/01" in text and "gather   done" in text
    assert main(["status", str(Path(config.run_uri).parent / "nothing")]) == 2


def test_ray_metrics_reach_prometheus_endpoint(ray_session) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def report() -> None:
        from worker.metrics import count_retry, report_progress

        report_progress("expert-07", "island-z", {"nimg": 1234, "loss": 0.5, "img_per_s": 99.0, "eta_s": 12.0})
        count_retry("expert-07", "island-z")
        time.sleep(3)  # stay alive while the metrics agent scrapes this worker

    ref = report.remote()
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {"ray_ddm_images_seen": "1234.0", "ray_ddm_loss": "0.5", "ray_ddm_images_per_second": "99.0",
              "ray_ddm_eta_seconds": "12.0", "ray_ddm_retries_total": "1.0"}
    found: dict[str, str] = {}
    deadline = time.time() + 60
    while time.time() < deadline and len(found) < len(wanted):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and 'expert="expert-07"' in line and 'island="island-z"' in line:
                found[name] = line.rsplit(" ", 1)[1]
        time.sleep(1)
    ray.get(ref)
    assert found == wanted

"""Never lose work: a committed artefact is deleted only when the user says so (`--redo STAGE`).

One tiny run (K = 2, 256 digit PNGs in a folder source, a few steps) is completed once; each test
works on its own copy of the run store (and of the source where it changes it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import resolve_config
from common.manifests import ExportRecord
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # one tiny pipeline run (~45 s idle) shared by the module

TINY = ["clustering.num_experts=2", "clustering.num_fine_centroids=16", "training.global_batch=128",
        "training.duration_nimg=1280", "training.checkpoint_every_nimg=640", "training.log_every_nimg=640",
        "router.training.duration_nimg=640", "router.training.checkpoint_every_nimg=640",
        "sampling.num_samples=8", "sampling.steps=4", "prepare.num_workers=1", "data.label_source=folder"]


def digit_folder(root: Path, n: int = 256) -> Path:
    """n of scikit-learn's 8x8 digits as PNGs in class folders (an ImageFolder source)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(n):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file in the run store but run.json (rewritten with the config on every run) and
    the source's re-hashing hint (cache/)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name not in ("run.json", "lease.json")
            and not str(p.relative_to(run)).startswith("cache/")}


def args(run: Path, source: Path, *extra: str) -> list[str]:
    out = ["run", "--run", str(run), "--quiet", "--set", f"data.source={source}"]
    for item in [*TINY, *extra]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def done(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("never-lose")
    source = digit_folder(base / "src")
    run = base / "run"
    config = resolve_config("digits", overrides=[f"run_uri={run}", f"data.source={source}", *TINY])
    summary = run_pipeline(config, show_progress=False)
    assert not any(s["skipped"] for s in summary.stages.values())
    return run, source


@pytest.fixture
def copy(done, tmp_path) -> tuple[Path, Path]:
    run, source = done
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(source, tmp_path / "src")  # copy2: times preserved
    return tmp_path / "run", tmp_path / "src"


def test_touching_every_source_file_skips_every_stage_and_keeps_every_byte(copy, capsys) -> None:
    run, source = copy
    before = snapshot(run)
    later = os.stat(next(source.rglob("*.png"))).st_mtime + 3600
    for png in source.rglob("*.png"):
        os.utime(png, (later, later))
    (source / "notes.txt").write_text("not an image: not an input")
    assert main(args(run, source)) == 0
    out = capsys.readouterr().out
    assert all(f"{s:<8} skipped (committed)" in out for s in ("prepare", "cluster", "train", "gather")), out
    assert snapshot(run) == before
    # The same files copied elsewhere without their times: the same content, the same run.
    moved = run.parent / "moved"
    shutil.copytree(source, moved, copy_function=shutil.copyfile)
    assert main(args(run, moved)) == 0
    assert snapshot(run) == before


def test_missing_source_is_one_line_and_deletes_nothing(copy, capsys) -> None:
    run, source = copy
    before = snapshot(run)
    source.rename(source.with_name("unmounted"))
    for extra in ([], ["--until", "prepare"]):
        code = main([*args(run, source), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"data.source {source}: not found" in err, err
        assert snapshot(run) == before


def test_changed_source_content_stops_naming_the_stage_and_the_file(copy, capsys) -> None:
    run, source = copy
    before = snapshot(run)
    victim = sorted(source.rglob("*.png"))[0]
    from PIL import Image

    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(victim)
    code = main([*args(run, source), "--until", "prepare"])  # before the fix even this deleted the training
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "stage prepare" in err and f"1 changed ({victim.relative_to(source)})" in err and "--redo prepare" in err
    assert snapshot(run) == before


def test_settings_only_change_keeps_training_and_real_change_asks(copy, capsys) -> None:
    run, source = copy
    before = snapshot(run)
    settings = ["training.log_every_nimg=128", "training.keep_checkpoints=5", "training.data_workers=1",
                "training.compile=true", "training.checkpoint_every_nimg=128", "router.training.log_every_nimg=64"]
    assert main(args(run, source, *settings)) == 0
    assert "train    skipped (committed)" in capsys.readouterr().out
    assert snapshot(run) == before
    code = main(args(run, source, "training.lr=0.0005"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "stage train" in err and "training.lr 0.001 -> 0.0005" in err and "--redo train" in err
    assert snapshot(run) == before


def test_damaged_exports_are_seen_verified_and_reexported_alone(copy, capsys) -> None:
    run, source = copy
    store = RunStore(str(run))
    gone = store.read_record("experts/00/export.json", ExportRecord)
    flipped = store.read_record("experts/01/export.json", ExportRecord)
    os.remove(run / gone.weights.path)                               # a deleted export
    path = run / flipped.weights.path                                 # bit rot: same size
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    router_export = store.read_bytes("router/export.json")
    metrics = {p: store.read_bytes(f"{p}/metrics.jsonl") for p in ("experts/00", "experts/01")}

    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ensemble: DAMAGED" in out and "gathered" not in out and "export damaged" in out
    assert main(["verify", str(run), "--damaged-only"]) == 1
    report = capsys.readouterr().out
    assert f"BAD {gone.weights.path}" in report and "missing" in report
    assert f"BAD {flipped.weights.path}" in report and "sha256" in report

    assert main(args(run, source)) == 0
    out = capsys.readouterr().out
    assert "prepare  skipped" in out and "cluster  skipped" in out
    assert store.read_bytes("router/export.json") == router_export  # never the whole run
    for prefix, raw in metrics.items():  # re-exported from the final checkpoint: no training step
        assert store.read_bytes(f"{prefix}/metrics.jsonl") == raw
        assert store.read_record(f"{prefix}/export.json", ExportRecord).nimg == 1280
    assert main(["verify", str(run)]) == 0
    assert "0 damaged" in capsys.readouterr().out


@pytest.mark.slow
def test_corrupt_newest_checkpoint_mid_run_finishes_from_the_previous_one(done, tmp_path) -> None:
    """Kill the actor training expert-00 mid-run and flip a bit in its newest checkpoint: the retry (counted)
    skips the damaged checkpoint and resumes from the one before it, instead of failing for good."""
    import json
    import threading
    import time

    import ray

    from common.manifests import CheckpointRecord, JobStatusRecord, StageRecord
    from worker.checkpoint import checkpoint_records

    _, source = done
    run = tmp_path / "run"
    every = 640  # checkpoints and metric rows at the same cadence
    config = resolve_config("digits", overrides=[f"run_uri={run}", f"data.source={source}", *TINY,
                                                 "training.duration_nimg=12800", f"training.checkpoint_every_nimg={every}",
                                                 f"training.log_every_nimg={every}", "islands.max_retries=1"])
    store = RunStore(str(run))
    hit: dict = {}

    def slot_running(job: str, island: str):
        for slot in range(8):
            actor = ray.get_actor(f"{island}#{slot}")  # slots are numbered from 0; a missing one raises
            if ray.get(actor.progress.remote(), timeout=30).get("job") == job:
                return actor
        raise AssertionError(f"no slot of {island} runs {job}")

    def fault() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            status = store.read_record("experts/00/status.json", JobStatusRecord) \
                if store.exists("experts/00/status.json") else None
            if status and status.state == "running" and len(checkpoint_records(store, "experts/00")) >= 2:
                ray.kill(slot_running("expert-00", status.island))  # the island slot actor training it
                time.sleep(0.3)  # the killed process writes nothing more
                key = checkpoint_records(store, "experts/00")[-1]
                record = store.read_record(key, CheckpointRecord)
                model = next(f.path for f in record.files if f.path.endswith("model.safetensors"))
                data = bytearray(store.read_bytes(model))
                data[len(data) // 2] ^= 0x01
                store.write_bytes(model, bytes(data))
                hit.update(nimg=record.nimg)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=fault, daemon=True)
    thread.start()
    run_pipeline(config, until="train", show_progress=False)
    thread.join(timeout=5)
    assert hit, "expert-00 finished before it could be hit; make it longer"
    status = store.read_record("experts/00/status.json", JobStatusRecord)
    assert (status.state, status.retries, status.attempts) == ("succeeded", 1, 2)
    assert store.read_record("stages/train.json", StageRecord).details["retries"]["expert-00"] == 1
    seen = [json.loads(line)["nimg"] for line in store.read_bytes("experts/00/metrics.jsonl").decode().splitlines()]
    restarts = [seen[i] for i in range(1, len(seen)) if seen[i] <= seen[i - 1]]
    # Resumed from the checkpoint before the damaged one: its first row is the damaged one's nimg again.
    assert restarts == [hit["nimg"]] and seen[-1] == 12800
    assert store.read_record("experts/00/export.json", ExportRecord).nimg == 12800

"""Stage inputs and the runner's refusals, with stand-in stage functions (no data, no Ray)."""

from __future__ import annotations

import json

import pytest

from common.config import resolve_config
from common.errors import UsageError
from common.manifests import StageResult
from common.storage import RunStore
from orchestrator.stages import STAGES, StageChanged, StageRunner, stage_fingerprints, stage_inputs


def _commit_all(store: RunStore, config, **kw) -> StageRunner:
    runner = StageRunner(store, config, **kw)
    runner.check()
    for stage in runner.stages:
        store.write_bytes({"prepare": "data/x", "cluster": "clusters/x", "train": "experts/00/export.json",
                           "hires": "hires/experts/00/export.json", "gather": "ensemble.json"}[stage], b"work")
        runner.run(stage, lambda: StageResult())
    return runner


def _config(tmp_path, *extra):
    return resolve_config("digits", overrides=[f"run_uri={tmp_path}", *extra])


def test_run_only_settings_are_not_stage_inputs(tmp_path) -> None:
    base = stage_fingerprints(stage_inputs(_config(tmp_path)))
    same = stage_fingerprints(stage_inputs(_config(
        tmp_path, "training.log_every_nimg=7", "training.keep_checkpoints=9", "training.data_workers=3",
        "training.compile=true", "training.checkpoint_every_nimg=5", "prepare.num_workers=4",
        "features.batch_size=3", "clustering.assign_chunk_rows=10", "router.training.log_every_nimg=3")))
    assert same == base
    lr = stage_fingerprints(stage_inputs(_config(tmp_path, "training.lr=0.5")))
    assert lr["cluster"] == base["cluster"] and lr["train"] != base["train"] and lr["gather"] != base["gather"]


def test_hires_is_a_stage_only_when_configured(tmp_path) -> None:
    plain = stage_fingerprints(stage_inputs(_config(tmp_path)))
    assert "hires" not in plain and "hires" in STAGES
    hires = stage_fingerprints(stage_inputs(_config(tmp_path, "hires.image_size=16")))
    assert all(hires[s] == plain[s] for s in ("prepare", "cluster", "train")) and hires["gather"] != plain["gather"]
    with pytest.raises(UsageError, match="--redo hires: expected one of prepare, cluster, train, gather"):
        StageRunner(RunStore(str(tmp_path)), _config(tmp_path), redo="hires")


def test_hires_checkpoints_made_with_other_inputs_stop_the_run(tmp_path) -> None:
    store, config = RunStore(str(tmp_path)), _config(tmp_path, "hires.image_size=16")
    runner = StageRunner(store, config)
    for stage in ("prepare", "cluster", "train"):
        runner.run(stage, lambda: StageResult())
    stamp = {"fingerprint": runner.fingerprints["hires"], "inputs": runner.inputs["hires"]}
    store.write_bytes("hires/experts/00/job.json", json.dumps(stamp).encode())
    StageRunner(store, config).check()  # the same inputs: it resumes
    with pytest.raises(StageChanged, match=r"stage hires .*hires\.lr null -> 0\.5; hires/experts/00 holds checkpoints"):
        StageRunner(store, _config(tmp_path, "hires.image_size=16", "hires.lr=0.5")).check()
    with pytest.raises(StageChanged, match=r"later stages hold committed work \(train, hires \(checkpoints\)\)"):
        StageRunner(store, config).invalidate_from("cluster")
    StageRunner(store, config).invalidate_from("train")  # train rerun below hires: its jobs resume, so do hires'
    assert store.exists("hires/experts/00/job.json") and not store.exists("stages/train.json")


def test_a_changed_committed_stage_stops_and_redo_alone_clears_it(tmp_path) -> None:
    store = RunStore(str(tmp_path))
    _commit_all(store, _config(tmp_path))
    changed = StageRunner(store, _config(tmp_path, "clustering.iterations=3"))
    with pytest.raises(StageChanged, match=r"stage cluster .*clustering.iterations 20 -> 3.*--redo cluster"):
        changed.check()
    StageRunner(store, _config(tmp_path, "clustering.iterations=3")).check(until="prepare")  # not reached: fine
    assert store.exists("clusters/x") and store.exists("experts/00/export.json")
    redo = StageRunner(store, _config(tmp_path, "clustering.iterations=3"), redo="cluster")
    redo.check()
    assert redo.run("prepare", lambda: StageResult()).skipped
    redo.run("cluster", lambda: StageResult())
    assert store.exists("data/x") and not store.exists("clusters/x") and not store.exists("experts/00/export.json")


def test_an_uncommitted_stage_above_committed_work_is_refused(tmp_path) -> None:
    store = RunStore(str(tmp_path))
    config = _config(tmp_path)
    _commit_all(store, config)
    store.delete("stages/prepare.json")  # e.g. removed by hand
    with pytest.raises(StageChanged, match="later stages hold committed work"):
        StageRunner(store, config).run("prepare", lambda: StageResult())
    assert store.exists("experts/00/export.json") and store.exists("ensemble.json")


def _as_older_version(store: RunStore, drop: str) -> None:
    """Rewrite the committed records as a version without the config field `drop` would have made them."""
    from common.manifests import StageRecord
    from orchestrator.stages import _chained

    upstream = ""
    for stage in (s for s in STAGES if store.exists(f"stages/{s}.json")):
        record = store.read_record(f"stages/{stage}.json", StageRecord)
        inputs = {k: v for k, v in record.details["inputs"].items() if k != drop}
        fingerprint = upstream = _chained(upstream, inputs)
        store.commit(f"stages/{stage}.json", record.model_copy(
            update={"fingerprint": fingerprint, "details": {**record.details, "inputs": inputs}}))


def test_records_from_before_a_new_field_still_match_while_it_holds_its_default(tmp_path) -> None:
    from orchestrator.stages import field_default

    store = RunStore(str(tmp_path))
    config = _config(tmp_path)
    _commit_all(store, config)
    assert stage_inputs(config)["prepare"]["data.max_items"] is None is field_default(config, "data.max_items")
    _as_older_version(store, "data.max_items")  # as if data.max_items had been added since
    runner = StageRunner(store, config)
    runner.check()  # no StageChanged: the field the records lack is at its default
    assert all(runner.run(stage, lambda: StageResult()).skipped for stage in runner.stages)
    assert store.exists("experts/00/export.json")
    assert StageRunner(store, config).fingerprints == runner.fingerprints  # stable: nothing was rewritten
    with pytest.raises(StageChanged, match=r"stage prepare .*data.max_items"):  # set away from the default
        StageRunner(store, _config(tmp_path, "data.max_items=100")).check()


def test_a_non_default_value_the_old_records_lack_is_a_change(tmp_path) -> None:
    store = RunStore(str(tmp_path))
    config = _config(tmp_path)  # the digits preset holds out 0.2, not the field's default
    _commit_all(store, config)
    _as_older_version(store, "data.holdout_fraction")
    with pytest.raises(StageChanged, match=r"stage prepare .*data.holdout_fraction"):
        StageRunner(store, config).check()


def test_redo_train_removes_the_job_outputs_and_their_curves_not_the_partitions(tmp_path) -> None:
    store = RunStore(str(tmp_path))
    _commit_all(store, _config(tmp_path))
    for key in ("experts/00/data/part.safetensors", "experts/00/checkpoints/1.json", "tb/expert-00/events.out.x",
                "tb/router/events.out.y"):
        store.write_bytes(key, b"work")
    StageRunner(store, _config(tmp_path, "training.lr=0.5"), redo="train").run("train", lambda: StageResult())
    assert store.exists("experts/00/data/part.safetensors") and store.exists("clusters/x")
    assert not store.exists("experts/00/checkpoints") and not store.list("tb/")

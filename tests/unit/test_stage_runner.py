"""Stage inputs and the runner's refusals, with stand-in stage functions (no data, no Ray)."""

from __future__ import annotations

import pytest

from common.config import resolve_config
from common.manifests import StageResult
from common.storage import RunStore
from orchestrator.stages import STAGES, StageChanged, StageRunner, stage_fingerprints, stage_inputs


def _commit_all(store: RunStore, config, **kw) -> StageRunner:
    runner = StageRunner(store, config, **kw)
    runner.check()
    for stage in STAGES:
        store.write_bytes({"prepare": "data/x", "cluster": "clusters/x", "train": "experts/00/export.json",
                           "gather": "ensemble.json"}[stage], b"work")
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

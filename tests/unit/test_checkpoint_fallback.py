"""Case 5: a damaged newest checkpoint is recorded and skipped; the job resumes from the newest good one."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig, TrainingConfig
from common.manifests import CheckpointRecord
from common.storage import RunStore
from tests.partitions import digits_like, write_expert_partition
from worker.checkpoint import _prune, checkpoint_records, latest_checkpoint
from worker.train import TrainJob, job_store, train

torch.set_num_threads(1)


def _job(duration: int) -> TrainJob:
    return TrainJob(name="expert-00", kind="expert", prefix="experts/00", manifest_key="experts/00/manifest.json",
                    model=ModelConfig(size="tiny", patch_size=2, conditioning="class"),
                    training=TrainingConfig(duration_nimg=duration, lr=1e-3, ema_decay=0.9, checkpoint_every_nimg=32,
                                            keep_checkpoints=2, log_every_nimg=16),
                    batch=16, micro_batch=16, seed=1, num_experts=1)


@pytest.fixture
def store(tmp_path) -> RunStore:
    store = RunStore(str(tmp_path / "run"))
    x, y = digits_like(48)
    write_expert_partition(store, 0, x, y, num_experts=1, num_classes=10)
    return store


def _damage_newest(store: RunStore, how: str) -> str:
    key = checkpoint_records(store, "experts/00")[-1]
    record = store.read_record(key, CheckpointRecord)
    if how == "record":
        store.write_bytes(key, b'{"torn": ')
    else:
        path = next(f.path for f in record.files if f.path.endswith("/model.safetensors"))
        data = bytearray(store.read_bytes(path))
        data[-1] ^= 0xFF  # one flipped bit: same size, other sha256
        store.write_bytes(path, bytes(data))
    return key


@pytest.mark.parametrize("how", ["payload", "record"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(store: RunStore, how: str, caplog) -> None:
    train(_job(64), job_store(store, _job(64)))  # checkpoints at 32 and 64
    bad = _damage_newest(store, how)
    job = _job(128)  # a longer run resumes: before the fix it died on the damaged file, every retry
    with caplog.at_level("INFO"):
        export = train(job, job_store(store, job))
    assert "resumed from 32 images" in caplog.text and "checkpoint unusable" in caplog.text
    assert export.nimg == 128
    assert store.exists(bad[:-len(".json")] + ".bad") or bad not in checkpoint_records(store, "experts/00")
    assert latest_checkpoint(store, "experts/00").nimg == 128


def test_pruning_keeps_the_newest_good_checkpoint(store: RunStore) -> None:
    train(_job(64), job_store(store, _job(64)))  # 32, 64
    _damage_newest(store, "record")  # 64 unreadable
    latest_checkpoint(store, "experts/00")  # reading it records it as bad
    _prune(store, "experts/00", keep=1)  # the window holds only the bad one; 32 must survive
    assert latest_checkpoint(store, "experts/00").nimg == 32

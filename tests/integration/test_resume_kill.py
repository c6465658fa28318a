"""A real SIGKILL mid-run, then resume: final weights are bit-identical to an uninterrupted run (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load

from common.config import ModelConfig, TrainingConfig
from common.manifests import ExportRecord
from common.storage import RunStore
from tests.partitions import digits_like, write_expert_partition
from worker.checkpoint import checkpoint_records, latest_checkpoint
from worker.train import TrainJob

ROOT = Path(__file__).resolve().parents[2]
JOB = TrainJob(name="expert-01", kind="expert", prefix="experts/01", manifest_key="experts/01/manifest.json",
               model=ModelConfig(size="tiny", patch_size=2, conditioning="class", label_dropout=0.1),
               training=TrainingConfig(duration_nimg=32 * 100, lr=1e-3, ema_decay=0.99, checkpoint_every_nimg=32 * 10,
                                       keep_checkpoints=2, log_every_nimg=32 * 20, warmup_nimg=320),
               batch=32, micro_batch=16, seed=3, island="island-b", num_experts=4)


def _start(store: RunStore, job_file: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "worker.train", "--job", str(job_file), "--store", store.url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(store: RunStore) -> dict[str, dict[str, torch.Tensor]]:
    export = store.read_record("experts/01/export.json", ExportRecord)
    ckpt = latest_checkpoint(store, "experts/01")
    files = {Path(f.path).name: f for f in ckpt.files}
    return {"export": load(store.get_payload(export.weights)),
            "model": load(store.get_payload(files["model.safetensors"])),
            "optimizer": load(store.get_payload(files["optimizer.safetensors"]))}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(JOB.model_dump_json())
    x, y = digits_like(300, seed=1)
    stores = {name: RunStore(str(tmp_path / name)) for name in ("straight", "killed")}
    for store in stores.values():
        write_expert_partition(store, 1, x, y, num_experts=4, num_classes=10)

    killed = stores["killed"]
    proc = _start(killed, job_file)
    deadline = time.monotonic() + 120
    while not checkpoint_records(killed, "experts/01"):  # the first committed checkpoint
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    at_kill = latest_checkpoint(killed, "experts/01").nimg
    assert not killed.exists("experts/01/export.json"), "the run finished before the kill; make it longer"
    assert at_kill < JOB.training.duration_nimg

    resumed = _start(killed, job_file)
    straight = _start(stores["straight"], job_file)
    logs = {}
    for name, p in (("resumed", resumed), ("straight", straight)):
        logs[name] = p.communicate(timeout=300)[0]
        assert p.returncode == 0, logs[name]
    assert f"resumed from {at_kill} images" in logs["resumed"], logs["resumed"]
    assert "resumed from" not in logs["straight"]

    a, b = _weights(stores["straight"]), _weights(killed)
    for part in ("export", "model", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after kill + resume at {at_kill} images"
    assert len(checkpoint_records(killed, "experts/01")) == JOB.training.keep_checkpoints

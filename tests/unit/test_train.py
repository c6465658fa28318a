"""The training loop: scoped data access, checkpoints (commit protocol, pruning, torn writes), export."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load

from common.config import ModelConfig, TrainingConfig
from common.manifests import ExpertManifest
from common.presets import digits
from common.storage import RunStore, ScopeError
from tests.partitions import digits_like, write_expert_partition
from worker.checkpoint import checkpoint_records, latest_checkpoint, load_export
from worker.train import TrainJob, expert_job, job_store, router_job, train

torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP threads only spin


def _job(**training) -> TrainJob:
    tc = dict(duration_nimg=16 * 12, lr=1e-3, ema_decay=0.9, checkpoint_every_nimg=16 * 4, keep_checkpoints=2,
              log_every_nimg=16 * 3, sample_every_nimg=16 * 6)
    return TrainJob(name="expert-00", kind="expert", prefix="experts/00", manifest_key="experts/00/manifest.json",
                    model=ModelConfig(size="tiny", patch_size=2, conditioning="class"),
                    training=TrainingConfig(**{**tc, **training}), batch=16, micro_batch=8, seed=1, num_experts=2)


@pytest.fixture
def two_experts(tmp_path) -> RunStore:
    store = RunStore(str(tmp_path / "run"))
    x, y = digits_like(96)
    write_expert_partition(store, 0, x[:48], y[:48], num_experts=2, num_classes=10, shard_rows=32)
    write_expert_partition(store, 1, x[48:], y[48:], num_experts=2, num_classes=10, shard_rows=32)
    return store


def test_expert_reading_outside_its_scope_fails(two_experts):
    view = job_store(two_experts, _job())
    with pytest.raises(ScopeError, match=r"experts/01/data/00000.safetensors: read outside this job's scope"):
        view.read_bytes("experts/01/data/00000.safetensors")
    with pytest.raises(ScopeError, match="write outside"):
        view.write_bytes("experts/01/export.json", b"{}")
    # A manifest tampered to list another expert's shard: training refuses to read it.
    manifest = two_experts.read_record("experts/00/manifest.json", ExpertManifest)
    other = two_experts.read_record("experts/01/manifest.json", ExpertManifest)
    two_experts.commit("experts/00/manifest.json", manifest.model_copy(update={"shards": other.shards[:1]}))
    view = two_experts.scoped(["experts/00"])
    with pytest.raises(ScopeError, match="experts/01/data/00000.safetensors: read outside"):
        train(_job(), view)


def test_checkpoints_export_metrics_and_samples(two_experts):
    job = _job()
    seen = []
    # A torn checkpoint (files, no record) at a later nimg, as a killed writer would leave it: never loaded.
    two_experts.write_bytes("experts/00/checkpoints/000000999999-deadbeef/model.safetensors", b"torn")
    record = train(job, job_store(two_experts, job), on_progress=seen.append)
    assert record.nimg == 16 * 12 and record.kind == "expert"
    # The TensorBoard writer is closed (its events are in the store): no thread of it outlives the job to
    # fail at interpreter exit, as it did in pool workers.
    assert two_experts.list("tb/expert-00")
    assert not [t for t in threading.enumerate() if type(t).__name__ == "_EventLoggerThread" and t.is_alive()]
    keys = checkpoint_records(two_experts, "experts/00")
    assert [k.rsplit("/", 1)[1] for k in keys] == ["000000000128.json", "000000000192.json"]  # kept the last 2
    assert not any("deadbeef" in k or "000000000064" in k for k in two_experts.list("experts/00/checkpoints"))
    rows = [json.loads(line) for line in two_experts.read_bytes("experts/00/metrics.jsonl").decode().splitlines()]
    assert [r["nimg"] for r in rows] == [48, 96, 144, 192]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert [p["nimg"] for p in seen] == [48, 96, 144, 192] and seen[-1]["eta_s"] == 0
    assert two_experts.list("experts/00/samples") == ["experts/00/samples/000000000096.png",
                                                        "experts/00/samples/000000000192.png"]
    model, export = load_export(two_experts, "experts/00")  # from_pretrained of verified local copies
    ema = load(two_experts.get_payload(next(f for f in latest_checkpoint(two_experts, "experts/00").files
                                            if f.path.endswith("ema.safetensors"))))
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    out = model(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8) and out.abs().sum() > 0
    assert train(job, job_store(two_experts, job)) == export  # finished: idempotent, no retraining


def test_resume_continues_to_the_same_weights(two_experts, tmp_path):
    """In-process variant of the SIGKILL test: stop at 96 images, resume to 192, compare with a straight run."""
    straight = RunStore(str(tmp_path / "straight"))
    x, y = digits_like(96)
    write_expert_partition(straight, 0, x[:48], y[:48], num_experts=2, num_classes=10, shard_rows=32)
    train(_job(), job_store(straight, _job()))
    train(_job(duration_nimg=96), job_store(two_experts, _job()))
    two_experts.delete("experts/00/export.json")
    train(_job(), job_store(two_experts, _job()))
    a, b = load_export(straight, "experts/00")[0], load_export(two_experts, "experts/00")[0]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_job_validation_and_builders():
    with pytest.raises(ValidationError, match="batch 64 is not a multiple of micro_batch 24 x 1 workers"):
        TrainJob(**{**_job().model_dump(), "batch": 64, "micro_batch": 24})
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrainJob(**{**_job().model_dump(), "lr": 1.0})
    config = digits()
    island = config.islands.pool[1]
    job = expert_job(config, 3, island)
    assert (job.name, job.prefix, job.manifest_key, job.batch, job.micro_batch, job.island) == \
        ("expert-03", "experts/03", "experts/03/manifest.json", 64, 64, "island-b")
    assert job.seed != expert_job(config, 2, island).seed
    router = router_job(config, island)
    assert (router.kind, router.prefix, router.batch, router.num_experts) == ("router", "router", 64, 4)


def test_train_on_every_store_backend(store_url):
    """file://, memory:// and s3:// (moto over HTTP): the same loop, commit protocol and export."""
    store = RunStore(store_url)
    x, y = digits_like(40)
    write_expert_partition(store, 0, x, y, num_experts=1, num_classes=10, shard_rows=16)
    job = _job(duration_nimg=48, checkpoint_every_nimg=16, log_every_nimg=16, sample_every_nimg=None)
    record = train(job, job_store(store, job))
    assert record.nimg == 48 and len(checkpoint_records(store, "experts/00")) == 2
    assert [k.rsplit("/", 1)[1] for k in store.list("experts/00/checkpoints")].count("model.safetensors") == 2
    model, _ = load_export(store, "experts/00")
    assert model.config.num_classes == 10


def test_a_use_gpu_job_without_cuda_is_an_error_naming_the_island_and_node(two_experts, monkeypatch):
    """Never a silent CPU run: use_gpu without a visible CUDA device stops before any work, naming both."""
    import socket

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = _job().model_copy(update={"use_gpu": True, "island": "h100x8"})
    with pytest.raises(RuntimeError, match=rf"^island h100x8: expert-00 has use_gpu = true but no CUDA device is "
                                          rf"visible on node {socket.gethostname()} "):
        train(job, job_store(two_experts, job))
    # A worker handed a CPU device (Ray Train without a GPU for it) fails the same way.
    with pytest.raises(RuntimeError, match=rf"^island h100x8: expert-00 has use_gpu = true but runs on cpu on node "
                                          rf"{socket.gethostname()}"):
        train(job, job_store(two_experts, job), device=torch.device("cpu"))
    assert not two_experts.list("experts/00/checkpoints") and not two_experts.exists("experts/00/metrics.jsonl")


def test_auto_micro_batch_on_cpu_trains_exactly_the_configured_job(two_experts, tmp_path):
    """per_worker_batch auto is a no-op on CPU: the same export as the configured micro-batch."""
    from tests.partitions import digits_like, write_expert_partition

    other = RunStore(str(tmp_path / "other"))
    x, y = digits_like(96)
    write_expert_partition(other, 0, x[:48], y[:48], num_experts=2, num_classes=10, shard_rows=32)
    base = _job(duration_nimg=48, checkpoint_every_nimg=48, sample_every_nimg=None)
    auto = base.model_copy(update={"auto_micro_batch": True})
    a, b = train(base, job_store(two_experts, base)), train(auto, job_store(other, auto))
    assert a.weights.sha256 == b.weights.sha256

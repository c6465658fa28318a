"""The high-resolution stage's data steps with aspect-ratio buckets, in-process (no Ray): the source is
prepared again with the buckets regenerated at the larger area, every row keeps its base cluster, and a
job starts from the base export it was given."""

from __future__ import annotations

import json

import pytest
import torch

from common.manifests import DatasetManifest, ExpertManifest, ExportRecord
from common.presets import shapes
from common.storage import RunStore
from orchestrator.hires_stage import HiresError, cut_partitions, hires_store, seed_inits
from orchestrator.train_stage import build_jobs
from tests.partitions import partition_indices
from worker.checkpoint import save_export
from worker.models.dit import build_dit
from worker.partition import cluster_data
from worker.prepare import prepare_data
from worker.train import train

torch.set_num_threads(1)


def _config(root):
    cfg = shapes()
    cfg.run_uri = str(root)
    cfg.data.gmm_items, cfg.data.shard_rows, cfg.data.captions = 160, 64, False
    cfg.data.shapes_aspect_ratios = [0.5, 1.0, 2.0]
    cfg.data.buckets = {"enabled": True, "max_aspect": 2.5}
    cfg.clustering.num_experts, cfg.training.global_batch = 2, 32
    cfg.training.log_every_nimg = 32
    cfg.hires = {"image_size": 32, "total_nimg": 128, "router_nimg": 64}
    return type(cfg).model_validate(cfg.model_dump())


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires-buckets") / "run"
    config, store = _config(root), RunStore(str(root))
    prepare_data(config, store)
    cluster_data(config, store)
    sub = hires_store(store)
    prepare_data(config.hires_run_config(), sub)
    cut_partitions(config, store, sub)
    return config, store, sub


def test_hires_buckets_are_regenerated_at_the_larger_area_and_rows_keep_their_base_cluster(continued) -> None:
    config, store, sub = continued
    base = store.read_record("data/dataset.json", DatasetManifest).extra["buckets"]
    high = sub.read_record("data/dataset.json", DatasetManifest).extra["buckets"]
    assert [b["bucket"] for b in base] == [[12, 20], [16, 16], [20, 12]]
    assert all(w * h <= 32 * 32 for w, h in (b["bucket"] for b in high)) and [32, 32] in [b["bucket"] for b in high]
    assert sum(b["rows"] for b in high) == sum(b["rows"] for b in base)
    for k in range(2):
        b = store.read_record(f"experts/{k:02d}/manifest.json", ExpertManifest)
        h = sub.read_record(f"experts/{k:02d}/manifest.json", ExpertManifest)
        assert partition_indices(sub, h) == partition_indices(store, b) and h.rows == b.rows
        assert all(ref.bucket is not None for ref in h.shards)  # the loader still batches per bucket


def test_a_hires_job_starts_from_the_base_export_and_trains_at_the_larger_shapes(continued) -> None:
    config, store, sub = continued
    with pytest.raises(HiresError, match="experts/00/export.json is not committed"):
        seed_inits(store, sub, ["expert-00"])
    shape = store.read_record("experts/00/manifest.json", ExpertManifest).latent_shape
    model = build_dit(config.model, shape, 4, None)
    save_export(store, "experts/00", "expert-00", "expert", 0, model)
    seed_inits(store, sub, ["expert-00"])
    init = sub.read_record("experts/00/init.json", ExportRecord)
    assert init.weights.sha256 == store.read_record("experts/00/export.json", ExportRecord).weights.sha256
    job = next(iter(build_jobs(config.hires_run_config(), "hires")["expert-00"].values()))
    assert (job.stage, job.init_key) == ("hires", "experts/00/init.json")
    record = train(job, sub)
    assert record.nimg == 64
    rows = [json.loads(line) for line in sub.read_bytes("experts/00/metrics.jsonl").splitlines()]
    assert rows[-1]["tokens"] >= 64 * 48  # patch 4: about 64 tokens per image, against the base's 16

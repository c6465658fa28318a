"""prepare + cluster end to end: the run store on S3 (moto over HTTP), and encoding on Ray actors."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

import worker.encoders as enc
from common.config import RunConfig
from common.manifests import ClusterManifest, DatasetManifest, ExpertManifest, RouterManifest, ShardRef
from common.storage import RunStore
from tests.partitions import load_numpy as load
from tests.unit.test_decode import BAD, GOOD, messy_config, write_messy_folder
from worker.partition import cluster_data
from worker.prepare import prepare_data

torch.set_num_threads(1)


def digits(n: int, **over) -> RunConfig:
    cfg = {"data": {"source": "builtin:digits", "image_size": 8, "channels": 1, "max_items": n, "shard_rows": 128},
           "features": {"extractor": "pixels", "pixels_size": 4},
           "clustering": {"num_experts": 4, "num_fine_centroids": 64}, "training": {"global_batch": 8}}
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return RunConfig.model_validate(cfg)


def test_prepare_and_cluster_with_the_run_store_on_s3(s3_endpoint, tmp_path):
    store = RunStore(f"s3://ddm-test/run-{uuid.uuid4().hex[:8]}")
    cfg = digits(300)
    assert prepare_data(cfg, store).counts == {"discovered": 300, "used": 300, "quarantined": 0, "shards": 3}
    ds = store.read_record("data/dataset.json", DatasetManifest)
    hold = ds.extra["holdout"]
    held = np.concatenate([load(store.get_payload(ShardRef(**r)))["index"] for r in hold["shards"]])
    assert hold["fraction"] == 0.1 and len(held) == hold["rows"] and 10 < hold["rows"] < 50
    result = cluster_data(cfg, store)
    train_rows = 300 - hold["rows"]
    assert result.counts["rows"] == train_rows and sum(result.counts[f"size_{e}"] for e in range(4)) == train_rows
    keys = store.list()
    for key in ("data/dataset.json", "data/quarantine.jsonl", "data/shards/00002.safetensors", "data/keys/00002.jsonl",
                "data/holdout/00000.safetensors",
                "clusters/centroids.safetensors", "clusters/assignments/00000.safetensors", "clusters/report.json",
                "clusters/sizes.png", "clusters/cluster_03.png", "clusters/clusters.json",
                "experts/00/manifest.json", "experts/03/manifest.json", "router/manifest.json"):
        assert key in keys, key
    cm = store.read_record("clusters/clusters.json", ClusterManifest)
    router = store.read_record("router/manifest.json", RouterManifest)
    assert router.rows == train_rows and [r.path for r in router.shards] == \
        [r.path for e in range(4) for r in store.read_record(f"experts/{e:02d}/manifest.json", ExpertManifest).shards]
    total, seen = 0, []
    for e in range(4):
        m = store.read_record(f"experts/{e:02d}/manifest.json", ExpertManifest)
        for ref in m.shards:  # every payload verifies against its recorded sha256
            part = load(store.get_payload(ref))
            shard = int(ref.path[-17:-12])
            assert ref.path.startswith(f"experts/{e:02d}/data/") and len(part["index"]) == ref.rows
            assert (load(store.get_payload(cm.assignments[shard]))["cluster"][part["index"] - 128 * shard] == e).all()
            seen.append(part["index"])
        total += m.rows
    assert total == train_rows == sum(cm.sizes)
    seen = np.concatenate(seen)
    assert len(np.intersect1d(seen, held)) == 0 and len(np.union1d(seen, held)) == 300  # held out = never trained on
    # a sampler or an expert on another machine sees the same counts through S3
    assert RunStore(store.url).read_record("data/dataset.json", DatasetManifest).used == 300


def test_messy_folder_source_on_s3(s3_endpoint, tmp_path):
    """The stage reads the source through fsspec too: the messy folder uploaded to S3."""
    import s3fs

    write_messy_folder(tmp_path / "src")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    src = f"ddm-test/src-{uuid.uuid4().hex[:8]}"
    fs.put(str(tmp_path / "src"), src, recursive=True)
    store = RunStore(f"s3://ddm-test/run-{uuid.uuid4().hex[:8]}")
    result = prepare_data(messy_config(f"s3://{src}"), store)  # type: ignore[arg-type]
    assert result.counts["used"] == len(GOOD) and result.counts["quarantined"] == len(BAD)


@pytest.mark.ray
def test_prepare_encodes_on_ray_actors(ray_session, tmp_path):
    from sklearn.datasets import load_digits

    cfg = digits(600, prepare={"num_workers": 2}, features={"batch_size": 64}, latents={"batch_size": 64},
                 data={"image_size": 8, "shard_rows": 256})
    calls = enc.ENCODE_CALLS
    store = RunStore(str(tmp_path / "ray"))
    result = prepare_data(cfg, store)
    assert enc.ENCODE_CALLS == calls  # nothing was encoded in this process
    pids = result.details["encode_processes"]
    # encoding ran in the pool's actors, never here; how Ray Data spreads the 10 batches over the two
    # actors is its scheduling (on a loaded box the first actor can take them all before the second starts)
    assert pids and os.getpid() not in pids and len(pids) <= 2
    # results come back in discovery order whatever actor finished first
    ds = store.read_record("data/dataset.json", DatasetManifest)
    shards = [load(store.get_payload(s)) for s in ds.shards]
    latents = np.concatenate([s["latents"] for s in shards])
    ref = load_digits()
    assert np.allclose(latents[:, 0], ref.images[:600] / 16 * 2 - 1, atol=1e-6)
    assert np.concatenate([s["labels"] for s in shards]).tolist() == ref.target[:600].tolist()
    assert cluster_data(cfg, store).counts["rows"] == 600 - ds.extra["holdout"]["rows"]


def test_rerun_rewrites_identical_payloads_and_changed_input_redoes(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    first = prepare_data(digits(200), store)
    again = prepare_data(digits(200), store)  # no record skipping here (the stage runner does that)
    assert [o.sha256 for o in first.outputs] == [o.sha256 for o in again.outputs]
    changed = prepare_data(digits(150), store)
    assert changed.counts["used"] == 150
    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert ds.used == 150 and store.list("data/shards") == ["data/shards/00000.safetensors", "data/shards/00001.safetensors"]
    assert np.array_equal(load(store.get_payload(ds.shards[1]))["index"], np.arange(128, 150))

"""Two-stage k-means: recovers separated blobs, balanced cap, K = 1, random, and the stage itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from common.config import ConfigError, RunConfig
from common.manifests import ClusterManifest, DatasetManifest, ExpertManifest, RouterManifest
from common.storage import RunStore
from tests.partitions import load_numpy as load
from worker.clustering import BalancedAssigner, balanced_capacity, fit_two_stage, kmeans, nearest, prepare
from worker.partition import cluster_data
from worker.prepare import prepare_data
from worker.prepare_shard import heldout_mask

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other work


def blobs(k: int = 5, per: int = 200, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(per)
    return centres[labels] + torch.randn(k * per, dim, generator=g), labels.numpy()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_two_stage_recovers_well_separated_blobs(metric):
    x, y = blobs()
    model = fit_two_stage(x, num_fine=64, num_coarse=5, iterations=15, metric=metric, seed=1)
    assert model.fine.shape == (64, 16) and model.coarse.shape == (5, 16)
    pred, _ = nearest(prepare(x, metric), model.coarse, metric)
    assert adjusted_rand_score(y, pred.numpy()) == 1.0
    # fine centroids consolidate consistently: each fine centroid's coarse cluster is pure
    fine_pred, _ = nearest(prepare(x, metric), model.fine, metric)
    assert adjusted_rand_score(y, model.fine_to_coarse[fine_pred].numpy()) == 1.0


def test_kmeans_keeps_every_centroid_alive_and_lowers_inertia():
    x, _ = blobs(k=3, per=50)
    one = kmeans(x, 40, iterations=1, seed=0)
    many = kmeans(x, 40, iterations=10, seed=0)
    assert (many.counts > 0).all() and many.inertia <= one.inertia
    with pytest.raises(ValueError, match="k = 200 must be between 1 and the number of points 150"):
        kmeans(x, 200)


def test_balanced_cap_is_respected_while_streaming():
    x, _ = blobs(k=2, per=300)
    x = torch.cat([x, x[:300] + 0.01])  # cluster 0 twice as big: 600 vs 300
    model = fit_two_stage(x, 32, 2, metric="euclidean", seed=0)
    cap = balanced_capacity(len(x), 2, 0.55)
    assign = BalancedAssigner(model.coarse, "euclidean", cap)
    out = torch.cat([assign(x[a:a + 128]) for a in range(0, len(x), 128)])
    sizes = torch.bincount(out, minlength=2).tolist()
    assert max(sizes) == cap == 495 and sum(sizes) == 900
    free = BalancedAssigner(model.coarse, "euclidean")(x)
    assert sorted(torch.bincount(free).tolist()) == [300, 600]
    with pytest.raises(ValueError, match=r"max_cluster_fraction = 0.2 x K = 4 < 1"):
        balanced_capacity(100, 4, 0.2)


def test_k_equal_one_is_the_monolith():
    x, _ = blobs(k=3, per=30)
    model = fit_two_stage(x, 16, 1, metric="cosine")
    assert model.coarse.shape == (1, 16) and (model.fine_to_coarse == 0).all()


def run_config(tmp_path, **clustering) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"source": "builtin:gmm", "image_size": 2, "channels": 1, "gmm_components": 4, "gmm_items": 600,
                 "gmm_separation": 6.0, "shard_rows": 256},
        "features": {"extractor": "pixels", "pixels_size": 2},
        "clustering": {"num_fine_centroids": 32, "metric": "euclidean", "assign_chunk_rows": 100, **clustering},
        "training": {"global_batch": 12}})


def test_cluster_stage_partitions_and_manifests(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    cfg = run_config(tmp_path, num_experts=4)
    prepare_data(cfg, store)
    result = cluster_data(cfg, store)
    cm = store.read_record("clusters/clusters.json", ClusterManifest)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    held = set(np.nonzero(heldout_mask(np.arange(600), 0.1, cfg.seed))[0].tolist())
    assert ds.extra["holdout"]["rows"] == len(held) > 0
    train = 600 - len(held)
    assert result.counts["rows"] == train and sum(cm.sizes) == train and len(cm.assignments) == 3
    assert {i.path for i in cm.images} >= {"clusters/sizes.png", "clusters/cluster_00.png"}
    # the gmm components are recovered exactly (separation 6 std)
    labels = np.concatenate([load(store.get_payload(s))["labels"] for s in ds.shards])
    clusters = np.concatenate([load(store.get_payload(a))["cluster"] for a in cm.assignments])
    assert adjusted_rand_score(labels, clusters) > 0.98
    seen = []
    for e in range(4):
        m = store.read_record(f"experts/{e:02d}/manifest.json", ExpertManifest)
        assert m.rows == cm.sizes[e] == result.counts[f"size_{e}"] and sum(s.rows for s in m.shards) == m.rows
        for ref in m.shards:
            part = load(store.get_payload(ref))
            assert (clusters[part["index"]] == e).all() and part["latents"].shape[1:] == (1, 2, 2)
            seen.extend(part["index"].tolist())
        assert sum(m.class_counts.values()) == m.rows
    assert sorted(seen) == sorted(set(range(600)) - held)  # disjoint, complete, no held-out row
    router = store.read_record("router/manifest.json", RouterManifest)  # the experts' shards, never held-out rows
    assert router.rows == train and router.shards == [r for e in range(4) for r in
                                                      store.read_record(f"experts/{e:02d}/manifest.json", ExpertManifest).shards]

    # a different K redoes the partition and leaves no stale expert behind
    cfg2 = run_config(tmp_path, num_experts=2)
    cluster_data(cfg2, store)
    assert store.read_record("experts/03/manifest.json", ExpertManifest) is None
    assert not store.list("experts/03")
    assert store.read_record("clusters/clusters.json", ClusterManifest).num_experts == 2


def test_random_partition_and_balanced_stage(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    cfg = run_config(tmp_path, num_experts=4, method="random")
    prepare_data(cfg, store)
    result = cluster_data(cfg, store)
    sizes = [result.counts[f"size_{e}"] for e in range(4)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 600 - int(heldout_mask(np.arange(600), 0.1, cfg.seed).sum())
    cm = store.read_record("clusters/clusters.json", ClusterManifest)
    assert cm.method == "random" and load(store.get_payload(cm.centroids))["coarse"].shape == (4, 4)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    labels = np.concatenate([load(store.get_payload(s))["labels"] for s in ds.shards])
    clusters = np.concatenate([load(store.get_payload(a))["cluster"] for a in cm.assignments])
    assert adjusted_rand_score(labels, clusters) < 0.05  # random is independent of the content
    balanced = cluster_data(run_config(tmp_path, num_experts=2, balanced=True, max_cluster_fraction=0.51), store)
    assert max(balanced.counts["size_0"], balanced.counts["size_1"]) <= 306


def test_empty_cluster_is_refused_with_the_sizes(tmp_path):
    from tests.unit.test_decode import gradient, png

    (tmp_path / "src").mkdir()
    for i in range(6):  # identical content, kept: every feature is the same point
        (tmp_path / "src" / f"{i}.png").write_bytes(png(gradient(seed=0)))
    cfg = RunConfig.model_validate({
        "data": {"source": str(tmp_path / "src"), "image_size": 8, "channels": 1, "duplicate_policy": "keep",
                 "label_source": "none", "holdout_fraction": 0},
        "clustering": {"num_experts": 2}, "training": {"global_batch": 8}})
    store = RunStore(str(tmp_path / "run"))
    prepare_data(cfg, store)
    with pytest.raises(ConfigError, match=r"^clustering.num_experts = 2 leaves cluster\(s\) \[1\] empty \(sizes \[6, 0\]\)"):
        cluster_data(cfg, store)
    assert store.read_record("clusters/clusters.json", ClusterManifest) is None

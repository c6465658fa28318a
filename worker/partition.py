"""The cluster stage: fit two-stage k-means on a feature sample, stream the assignment over the data
shards, and cut each expert's own partition (docs/design.md §2, §4; paper §4.1).

Store layout written here:
    clusters/centroids.safetensors        fine [F,D], coarse [K,D], fine_to_coarse [F], fine_counts [F]
    clusters/assignments/<i:05d>.safetensors   cluster [N_i] int64, aligned with data shard i (held-out rows
                                          included: their cluster is the router's target in ddm eval)
    clusters/router/<k:02d>-<i:05d>.safetensors  cluster [rows] = k, aligned with expert k's shard i
    clusters/report.json, sizes.png, cluster_<k:02d>.png (thumbnail grid per cluster)
    clusters/clusters.json                ClusterManifest (committed after the above)
    experts/<k:02d>/data/<i:05d>.safetensors   training rows of data shard i in cluster k (skipped when none);
                                          `index` maps each row to its source key (data/keys/<i>.jsonl)
    experts/<k:02d>/manifest.json         ExpertManifest, committed after its shards
    router/manifest.json                  RouterManifest: every expert shard + its constant-cluster file

Held-out rows (data.holdout_fraction, worker.prepare.heldout_mask) are assigned a cluster but enter no
partition, no router row and no k-means fit sample.

Memory is bounded by one shard plus the fit sample: features are read chunk by chunk
(`clustering.assign_chunk_rows`) from each shard, and partitions are cut shard by shard.

An empty cluster (possible with tiny or degenerate data) is REFUSED with a one-line error naming K
and the sizes: an expert with no data cannot be trained, and silently moving rows would change
the partition the paper's method is defined on. Lower K, or set clustering.balanced.
"""

from __future__ import annotations

from common.keys import ROUTER, expert_prefix, manifest_key

from common.config import ConfigError

import io
import json
import logging
import re
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from common.config import RunConfig
from common.manifests import (ClusterManifest, DatasetManifest, ExpertManifest, FileRef, RouterManifest,
                              ShardRef, StageResult)
from common.storage import RunStore
from worker.clustering import BalancedAssigner, balanced_capacity, fit_two_stage, prepare, resolve_device
from worker.prepare import heldout_mask

log = logging.getLogger(__name__)
GRID_THUMBS = 64
PARTITION_TENSORS = ("latents", "labels", "index", "text_pooled", "text_tokens")


def _shard_ranges(ds: DatasetManifest) -> list[tuple[int, int]]:
    starts = np.cumsum([0] + [s.rows for s in ds.shards])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def training_mask(ds: DatasetManifest, index: np.ndarray) -> np.ndarray:
    """True for the rows experts and router may train on: every row not held out for evaluation."""
    hold = ds.extra.get("holdout") or {}
    if not hold.get("fraction"):
        return np.ones(len(index), dtype=bool)
    return ~heldout_mask(index, hold["fraction"], hold["seed"])


def _training_positions(store: RunStore, ds: DatasetManifest) -> torch.Tensor:
    """Dataset positions (shard after shard) of the training rows."""
    keep = []
    for ref in ds.shards:
        with safe_open(store.local_copy(ref), "np") as f:
            keep.append(training_mask(ds, f.get_tensor("index")))
    return torch.from_numpy(np.nonzero(np.concatenate(keep))[0])


def fit_sample(store: RunStore, ds: DatasetManifest, size: int, seed: int) -> torch.Tensor:
    """A uniform random sample of training feature rows (seeded), read shard by shard."""
    rows = _training_positions(store, ds)
    pick = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:min(size, len(rows))]]
    pick = pick.sort().values
    parts = []
    for ref, (a, b) in zip(ds.shards, _shard_ranges(ds)):
        local = pick[(pick >= a) & (pick < b)] - a
        if len(local):
            with safe_open(store.local_copy(ref), "pt") as f:
                parts.append(f.get_tensor("features")[local])
    return torch.cat(parts)


def _clear(store: RunStore) -> None:
    """Drop a previous clustering: records first, then payloads (none of it is trusted any more)."""
    experts = sorted({k.split("/")[1] for k in store.list("experts") if re.match(r"^experts/\d+/", k)})
    for record in ["clusters/clusters.json", manifest_key(ROUTER)] + [manifest_key(f"experts/{e}") for e in experts]:
        store.delete(record)
    store.delete("clusters")
    for e in experts:
        store.delete(f"experts/{e}/data")


def _grid(thumbs: list[np.ndarray], cols: int = 8) -> bytes:
    from PIL import Image

    h, w, c = thumbs[0].shape
    zoom = max(1, 32 // max(h, w))
    rows = (len(thumbs) + cols - 1) // cols
    pad = 1  # a grey gutter, so tiny tiles do not run into each other
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for j, t in enumerate(thumbs):
        r, q = divmod(j, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = t
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _histogram(sizes: list[int], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(sizes) + 2), 3))
    ax.bar(range(len(sizes)), sizes, color="#4477aa")
    ax.set_xlabel("cluster (expert)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def cluster_data(config: RunConfig, store: RunStore) -> StageResult:
    """Cluster the prepared dataset into K partitions and write every expert's data and manifest."""
    cc, k = config.clustering, config.clustering.num_experts
    ds = store.read_record("data/dataset.json", DatasetManifest)
    if ds is None:
        raise FileNotFoundError(f"{store.url}/data/dataset.json: not committed; run the prepare stage first")
    n = ds.used - int((ds.extra.get("holdout") or {}).get("rows", 0))  # training rows
    if k > n:
        raise ConfigError(f"clustering.num_experts = {k} exceeds the {n} prepared training rows")
    _clear(store)
    device = resolve_device(cc.device)
    details: dict[str, Any] = {}
    if cc.method == "random":
        # Ablation baseline: a seeded permutation dealt round-robin, so sizes differ by at most one.
        # Training rows are dealt first, so their sizes differ by at most one; held-out rows get a draw too.
        gen = torch.Generator().manual_seed(config.seed)
        perm = torch.randperm(ds.used, generator=gen) % k
        train_pos = _training_positions(store, ds)
        perm[train_pos] = torch.randperm(len(train_pos), generator=gen) % k
        fine = coarse = None
    else:
        sample = fit_sample(store, ds, cc.fit_sample, config.seed).to(device)
        model = fit_two_stage(sample, cc.num_fine_centroids, k, cc.iterations, cc.metric, config.seed)
        fine, coarse = model.fine, model.coarse
        # Capacity over every row: held-out rows are assigned a cluster too (they train nothing).
        cap = balanced_capacity(ds.used, k, cc.max_cluster_fraction) if cc.balanced else None
        assign = BalancedAssigner(coarse, cc.metric, cap)
        details = {"fit_rows": len(sample), "num_fine": len(fine), "inertia_fine": model.inertia_fine,
                   "inertia_coarse": model.inertia_coarse, "capacity": cap}

    sums = torch.zeros(k, ds.feature_dim, dtype=torch.float64)
    sizes = torch.zeros(k, dtype=torch.long)
    assigned = torch.zeros(k, dtype=torch.long)  # every row, held-out included (random centroids)
    class_counts: list[dict[int, int]] = [{} for _ in range(k)]
    thumbs: list[list[np.ndarray]] = [[] for _ in range(k)]
    assignment_refs: list[ShardRef] = []
    expert_refs: list[list[ShardRef]] = [[] for _ in range(k)]
    router_refs: list[list[ShardRef]] = [[] for _ in range(k)]
    for i, (ref, (a, b)) in enumerate(zip(ds.shards, _shard_ranges(ds))):
        with safe_open(store.local_copy(ref), "pt") as f:
            feats = f.get_slice("features")
            if cc.method == "random":
                cluster = perm[a:b].clone()
                for c0 in range(0, b - a, cc.assign_chunk_rows):
                    x = prepare(feats[c0:c0 + cc.assign_chunk_rows], cc.metric)
                    sums.index_add_(0, cluster[c0:c0 + len(x)], x.double())
            else:
                cluster = torch.cat([assign(feats[c0:c0 + cc.assign_chunk_rows])
                                     for c0 in range(0, b - a, cc.assign_chunk_rows)])
            tensors = {name: f.get_tensor(name).numpy() for name in PARTITION_TENSORS if name in f.keys()}
            shard_thumbs = f.get_tensor("thumbs").numpy() if "thumbs" in f.keys() else None
        train = training_mask(ds, tensors["index"])
        sizes += torch.bincount(cluster[torch.from_numpy(train)], minlength=k)
        assigned += torch.bincount(cluster, minlength=k)
        aref = store.put_payload(f"clusters/assignments/{i:05d}.safetensors",
                                 save_safetensors({"cluster": cluster.numpy().astype(np.int64)}))
        assignment_refs.append(ShardRef(**aref.model_dump(), rows=b - a))
        cl = cluster.numpy()
        for e in range(k):
            rows = np.nonzero((cl == e) & train)[0]
            if len(rows) == 0:
                continue
            part = {name: np.ascontiguousarray(v[rows]) for name, v in tensors.items()}
            eref = store.put_payload(f"{expert_prefix(e)}/data/{i:05d}.safetensors", save_safetensors(part))
            expert_refs[e].append(ShardRef(**eref.model_dump(), rows=len(rows)))
            rref = store.put_payload(f"clusters/router/{e:02d}-{i:05d}.safetensors",
                                     save_safetensors({"cluster": np.full(len(rows), e, dtype=np.int64)}))
            router_refs[e].append(ShardRef(**rref.model_dump(), rows=len(rows)))
            labels, counts = np.unique(part["labels"], return_counts=True)
            for label, count in zip(labels.tolist(), counts.tolist()):
                if label >= 0:
                    class_counts[e][label] = class_counts[e].get(label, 0) + count
            if shard_thumbs is not None and len(thumbs[e]) < GRID_THUMBS:
                thumbs[e].extend(shard_thumbs[rows[:GRID_THUMBS - len(thumbs[e])]])

    size_list = sizes.tolist()
    if min(size_list) == 0:
        empty = [e for e, s in enumerate(size_list) if s == 0]
        raise ConfigError(f"clustering.num_experts = {k} leaves cluster(s) {empty} empty (sizes {size_list}); "
                         "lower clustering.num_experts or set clustering.balanced=true")
    if coarse is None:  # random: centroids are the clusters' feature means, for the report and router
        coarse = (sums / assigned[:, None]).float()
        coarse = prepare(coarse, cc.metric)
        fine = coarse
    f2c = torch.arange(k) if cc.method == "random" else model.fine_to_coarse
    fine_counts = sizes if cc.method == "random" else model.fine_counts
    centroids = store.put_payload("clusters/centroids.safetensors", save_safetensors({
        "fine": fine.cpu().numpy(), "coarse": coarse.cpu().numpy(),
        "fine_to_coarse": f2c.cpu().numpy().astype(np.int64), "fine_counts": fine_counts.cpu().numpy().astype(np.float32)}))

    images = [store.put_payload("clusters/sizes.png", _histogram(size_list, f"{cc.method}, K = {k}, {n} rows"))]
    images += [store.put_payload(f"clusters/cluster_{e:02d}.png", _grid(thumbs[e])) for e in range(k) if thumbs[e]]
    purity = sum(max(c.values()) for c in class_counts if c) / max(1, sum(sum(c.values()) for c in class_counts))
    report = {"method": cc.method, "metric": cc.metric, "num_experts": k, "rows": n, "sizes": size_list,
              "fractions": [s / n for s in size_list], "balanced": cc.balanced,
              "class_counts": [{str(c): v for c, v in sorted(cc_.items())} for cc_ in class_counts],
              "label_purity": purity, **details}
    report_ref = store.put_payload("clusters/report.json", json.dumps(report, indent=2).encode())
    store.commit("clusters/clusters.json", ClusterManifest(
        method=cc.method, metric=cc.metric, num_experts=k, num_fine=len(fine), sizes=size_list,
        centroids=centroids, assignments=assignment_refs, report=report_ref, images=images))

    for e in range(k):
        store.commit(manifest_key(expert_prefix(e)), ExpertManifest(
            expert=e, num_experts=k, rows=size_list[e], latent_shape=ds.latent_shape, num_classes=ds.num_classes,
            text_dim=ds.text_dim, shards=expert_refs[e], class_counts=class_counts[e]))
    # The router reads the experts' own shards (training rows only), each with a constant-cluster file.
    store.commit("router/manifest.json", RouterManifest(
        num_experts=k, rows=n, latent_shape=ds.latent_shape, num_classes=ds.num_classes, text_dim=ds.text_dim,
        shards=[r for refs in expert_refs for r in refs], assignments=[r for refs in router_refs for r in refs]))
    log.info("cluster: %s K=%d sizes %s (label purity %.2f)", cc.method, k, size_list, purity)
    outputs = [centroids, report_ref, *images] + [FileRef(path=r.path, sha256=r.sha256, size=r.size)
                                                 for r in assignment_refs]
    return StageResult(counts={"rows": n, "num_experts": k, **{f"size_{e}": s for e, s in enumerate(size_list)}},
                       outputs=outputs, details={"label_purity": purity, **details})

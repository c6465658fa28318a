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
                                          `index` maps each row to its source key (data/keys/<i>.jsonl);
                                          with data.buckets it keeps shard i's bucket (ShardRef.bucket), so
                                          every partition is grouped by bucket and the loader batches per bucket
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

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from common.config import ConfigError, RunConfig
from common.keys import ROUTER, expert_prefix, manifest_key
from common.manifests import ClusterManifest, DatasetManifest, ExpertManifest, FileRef, RouterManifest, ShardRef, StageResult
from common.storage import RunStore
from worker.clustering import BalancedAssigner, balanced_capacity, fit_two_stage, prepare, resolve_device
from worker.prepare_shard import heldout_mask

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


@dataclass
class ShardAssignment:
    """What assigning one data shard yields: its payloads' refs and small per-cluster summaries."""
    assignment: ShardRef
    experts: list[ShardRef | None]
    router: list[ShardRef | None]                         # constant-cluster file beside each expert part
    sizes: torch.Tensor                                   # [K] training rows
    assigned: torch.Tensor                                # [K] every row, held-out included
    sums: torch.Tensor                                    # [K, D] feature sums (random method only)
    class_counts: list[dict[int, int]]
    thumbs: list[list[np.ndarray]] = field(default_factory=list)


def assign_shard(store: RunStore, ds: DatasetManifest, i: int, k: int, metric: str, chunk: int,
                 assigner: BalancedAssigner | None = None, cluster: torch.Tensor | None = None) -> ShardAssignment:
    """Assign data shard i (features read `chunk` rows at a time) and write its assignment file and each
    expert's training rows of it (held-out rows get a cluster, no partition). `cluster` is given for the
    random method, else `assigner` decides."""
    ref = ds.shards[i]
    sums = torch.zeros(k, 0, dtype=torch.float64)
    with safe_open(store.local_copy(ref), "pt") as f:
        feats = f.get_slice("features")
        if cluster is None:
            assert assigner is not None
            cluster = torch.cat([assigner(feats[c0:c0 + chunk]) for c0 in range(0, ref.rows, chunk)])
        else:  # random: the clusters' feature means stand in for centroids
            sums = torch.zeros(k, feats.get_shape()[1], dtype=torch.float64)
            for c0 in range(0, ref.rows, chunk):
                x = prepare(feats[c0:c0 + chunk], metric).double()
                sums.index_add_(0, cluster[c0:c0 + len(x)], x)
        tensors = {name: f.get_tensor(name) for name in PARTITION_TENSORS if name in f.keys()}
        shard_thumbs = f.get_tensor("thumbs").numpy() if "thumbs" in f.keys() else None
    aref = store.put_payload(f"clusters/assignments/{i:05d}.safetensors", save_safetensors({"cluster": cluster.long()}))
    train = torch.from_numpy(training_mask(ds, tensors["index"].numpy()))
    out = ShardAssignment(ShardRef(**aref.model_dump(), rows=ref.rows), [None] * k, [None] * k,
                          torch.bincount(cluster[train], minlength=k), torch.bincount(cluster, minlength=k), sums,
                          [{} for _ in range(k)], [[] for _ in range(k)])
    for e in range(k):
        rows = ((cluster == e) & train).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        part = {name: v[rows].contiguous() for name, v in tensors.items()}
        eref = store.put_payload(f"{expert_prefix(e)}/data/{i:05d}.safetensors", save_safetensors(part))
        out.experts[e] = ShardRef(**eref.model_dump(), rows=len(rows), bucket=ref.bucket)  # the loader batches per bucket
        rref = store.put_payload(f"clusters/router/{e:02d}-{i:05d}.safetensors",
                                 save_safetensors({"cluster": torch.full((len(rows),), e, dtype=torch.long)}))
        out.router[e] = ShardRef(**rref.model_dump(), rows=len(rows))
        labels, counts = part["labels"].unique(return_counts=True)
        out.class_counts[e] = {int(la): int(c) for la, c in zip(labels.tolist(), counts.tolist()) if la >= 0}
        if shard_thumbs is not None:
            out.thumbs[e] = list(shard_thumbs[rows[:GRID_THUMBS].numpy()])
    return out


def _assign_all(store: RunStore, ds: DatasetManifest, jobs: list[dict], k: int, metric: str, chunk: int,
                parallel: bool) -> Iterator[ShardAssignment]:
    """Every shard's assignment, in shard order: in this process, or as Ray tasks (a bounded number in
    flight, so the driver holds a few shards' summaries, never the data) when `parallel` and Ray is up."""
    import ray

    if not parallel or not ray.is_initialized() or store.protocol == "memory":  # memory://: this process only
        for i, job in enumerate(jobs):
            yield assign_shard(store, ds, i, k, metric, chunk, **job)
        return
    task = ray.remote(num_cpus=1)(assign_shard)
    assigner = ray.put(jobs[0]["assigner"])
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    futures: dict[int, Any] = {}
    for i in range(len(ds.shards)):
        while len(futures) < window and i + len(futures) < len(ds.shards):
            j = i + len(futures)
            futures[j] = task.remote(store, ds, j, k, metric, chunk, assigner)
        yield ray.get(futures.pop(i))


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


@dataclass
class MethodPlan:
    """How one clustering method assigns each data shard's rows, and the centroids it ends with."""
    jobs: list[dict]                      # per data shard: assign_shard's method arguments
    parallel: bool                        # whether shards may be assigned as Ray tasks
    details: dict[str, Any]
    # (training sizes [K], rows assigned [K], feature sums [K, D]) -> fine, coarse, fine_to_coarse, fine_counts
    centroids: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def random_plan(config: RunConfig, store: RunStore, ds: DatasetManifest, n: int) -> MethodPlan:
    """Ablation baseline: a seeded permutation dealt round-robin. Training rows are dealt first, so their
    sizes differ by at most one; held-out rows get a draw too. The clusters' feature means stand in for
    centroids (the report and the router's picture of them)."""
    k, metric = config.clustering.num_experts, config.clustering.metric
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(ds.used, generator=gen) % k
    train_pos = _training_positions(store, ds)
    perm[train_pos] = torch.randperm(len(train_pos), generator=gen) % k

    def centroids(sizes: torch.Tensor, assigned: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
        coarse = prepare((sums / assigned[:, None]).float(), metric)
        return {"fine": coarse, "coarse": coarse, "fine_to_coarse": torch.arange(k), "fine_counts": sizes}

    return MethodPlan([dict(cluster=perm[a:b].clone()) for a, b in _shard_ranges(ds)], False, {}, centroids)


def kmeans2_plan(config: RunConfig, store: RunStore, ds: DatasetManifest, n: int) -> MethodPlan:
    """Two-stage k-means fitted on a bounded sample of training rows; every row goes to its nearest coarse
    centroid (under a size cap when balanced). Capacity counts every row: held-out rows are assigned a
    cluster too (they train nothing)."""
    cc, k = config.clustering, config.clustering.num_experts
    sample = fit_sample(store, ds, cc.fit_sample, config.seed).to(resolve_device(cc.device))
    model = fit_two_stage(sample, cc.num_fine_centroids, k, cc.iterations, cc.metric, config.seed)
    cap = balanced_capacity(ds.used, k, cc.max_cluster_fraction) if cc.balanced else None
    assign = BalancedAssigner(model.coarse if cap else model.coarse.cpu(), cc.metric, cap)  # Ray tasks get CPU centroids
    details = {"fit_rows": len(sample), "num_fine": len(model.fine), "inertia_fine": model.inertia_fine,
               "inertia_coarse": model.inertia_coarse, "capacity": cap}
    parallel = not cc.balanced and n >= cc.parallel_min_rows  # a size cap must be applied in shard order
    tensors = {"fine": model.fine, "coarse": model.coarse, "fine_to_coarse": model.fine_to_coarse,
               "fine_counts": model.fine_counts}
    return MethodPlan([dict(assigner=assign) for _ in _shard_ranges(ds)], parallel, details, lambda *_: tensors)


METHODS: dict[str, Callable[[RunConfig, RunStore, DatasetManifest, int], MethodPlan]] = {
    "random": random_plan, "kmeans2": kmeans2_plan}


class PartitionTotals:
    """Every shard's assignment summed in shard order: what the cluster manifest, the report and the
    partitions' manifests are made of."""

    def __init__(self, k: int, feature_dim: int) -> None:
        self.k = k
        self.sizes = torch.zeros(k, dtype=torch.long)       # training rows
        self.assigned = torch.zeros(k, dtype=torch.long)    # every row, held-out included
        self.sums = torch.zeros(k, feature_dim, dtype=torch.float64)
        self.class_counts: list[dict[int, int]] = [{} for _ in range(k)]
        self.thumbs: list[list[np.ndarray]] = [[] for _ in range(k)]
        self.assignments: list[ShardRef] = []
        self.expert_refs: list[list[ShardRef]] = [[] for _ in range(k)]
        self.router_refs: list[list[ShardRef]] = [[] for _ in range(k)]

    def add(self, part: ShardAssignment) -> None:
        self.sizes += part.sizes
        self.assigned += part.assigned
        if part.sums.numel():
            self.sums += part.sums
        self.assignments.append(part.assignment)
        for e in range(self.k):
            if part.experts[e] is not None:
                self.expert_refs[e].append(part.experts[e])
                self.router_refs[e].append(part.router[e])
            for label, count in part.class_counts[e].items():
                self.class_counts[e][label] = self.class_counts[e].get(label, 0) + count
            self.thumbs[e].extend(part.thumbs[e][:GRID_THUMBS - len(self.thumbs[e])])

    def commit_partitions(self, store: RunStore, ds: DatasetManifest) -> None:
        """Commit every expert's manifest and the router's, after all the shards they list are written."""
        k, sizes = self.k, self.sizes.tolist()
        for e in range(k):
            store.commit(manifest_key(expert_prefix(e)), ExpertManifest(
                expert=e, num_experts=k, rows=sizes[e], latent_shape=ds.latent_shape, num_classes=ds.num_classes,
                text_dim=ds.text_dim, shards=self.expert_refs[e], class_counts=self.class_counts[e]))
        store.commit(manifest_key(ROUTER), RouterManifest(
            num_experts=k, rows=sum(sizes), latent_shape=ds.latent_shape, num_classes=ds.num_classes,
            text_dim=ds.text_dim, shards=[r for refs in self.expert_refs for r in refs],
            assignments=[r for refs in self.router_refs for r in refs]))


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
    t0 = time.perf_counter()
    plan = METHODS[cc.method](config, store, ds, n)

    totals = PartitionTotals(k, ds.feature_dim)
    t1 = time.perf_counter()
    for part in _assign_all(store, ds, plan.jobs, k, cc.metric, cc.assign_chunk_rows, plan.parallel):
        totals.add(part)
    sizes, class_counts, thumbs, assignment_refs = totals.sizes, totals.class_counts, totals.thumbs, totals.assignments
    details = {**plan.details, "parallel_assignment": plan.parallel}
    timings = {"fit_s": round(t1 - t0, 3), "assign_s": round(time.perf_counter() - t1, 3)}  # not in the report: it stays reproducible

    size_list = sizes.tolist()
    if min(size_list) == 0:
        empty = [e for e, s in enumerate(size_list) if s == 0]
        raise ConfigError(f"clustering.num_experts = {k} leaves cluster(s) {empty} empty (sizes {size_list}); "
                         "lower clustering.num_experts or set clustering.balanced=true")
    found = plan.centroids(sizes, totals.assigned, totals.sums)
    centroids = store.put_payload("clusters/centroids.safetensors", save_safetensors({
        "fine": found["fine"].cpu().float().clone(), "coarse": found["coarse"].cpu().float().clone(),
        "fine_to_coarse": found["fine_to_coarse"].cpu().long().contiguous(),
        "fine_counts": found["fine_counts"].cpu().float().contiguous()}))

    images = [store.put_payload("clusters/sizes.png", _histogram(size_list, f"{cc.method}, K = {k}, {n} rows"))]
    images += [store.put_payload(f"clusters/cluster_{e:02d}.png", _grid(thumbs[e])) for e in range(k) if thumbs[e]]
    purity = sum(max(c.values()) for c in class_counts if c) / max(1, sum(sum(c.values()) for c in class_counts))
    report = {"method": cc.method, "metric": cc.metric, "num_experts": k, "rows": n, "sizes": size_list,
              "fractions": [s / n for s in size_list], "balanced": cc.balanced,
              "class_counts": [{str(c): v for c, v in sorted(cc_.items())} for cc_ in class_counts],
              "label_purity": purity, **details}
    report_ref = store.put_payload("clusters/report.json", json.dumps(report, indent=2).encode())
    store.commit("clusters/clusters.json", ClusterManifest(
        method=cc.method, metric=cc.metric, num_experts=k, num_fine=len(found["fine"]), sizes=size_list,
        centroids=centroids, assignments=assignment_refs, report=report_ref, images=images))

    totals.commit_partitions(store, ds)
    log.info("cluster: %s K=%d sizes %s (label purity %.2f)", cc.method, k, size_list, purity)
    outputs = [centroids, report_ref, *images] + [FileRef(path=r.path, sha256=r.sha256, size=r.size)
                                                 for r in assignment_refs]
    return StageResult(counts={"rows": n, "num_experts": k, **{f"size_{e}": s for e, s in enumerate(size_list)}},
                       outputs=outputs, details={"label_purity": purity, **details, **timings})

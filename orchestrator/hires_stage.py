"""The high-resolution stage: every expert and the router continue from their base exports at a larger size.

The paper's text-to-image recipe trains at a base resolution, then continues at a larger one. Here the
continuation keeps everything the base stage decided: the same items (listing positions), the same
held-out rows and the same partition (each row's cluster is read from the base assignment by its
listing position, never re-clustered), with the same isolation and checkpoints. `hires/` inside the run
is a run store of the base layout (docs/design.md §4):

    hires/data/...                  the source prepared again at hires.image_size (its own resumable parts)
    hires/clusters/assignments/<i>  the base cluster of every row of hires data shard i
    hires/experts/<k>/data/<i>      expert k's training rows at the larger size; manifest.json
    hires/experts/<k>/init.json     the base export it starts from (copied server-side into its own folder,
                                    so an island reads nothing outside its job); then checkpoints, export
    hires/router/...                the same for the router

The stage resumes like the others: prepare skips committed parts, the partitions are cut once (their
manifests are the commit), and each job resumes from its newest checkpoint, else starts from init.json.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from common.config import RunConfig
from common.errors import DDMError
from common.keys import HIRES_ROOT, ROUTER, export_key, job_name, job_prefix, manifest_key
from common.manifests import ClusterManifest, DatasetManifest, ExportRecord, ShardRef, StageResult
from common.storage import RunStore
from orchestrator.controller import JobState, WorkerGroup
from orchestrator.train_stage import init_key, run_train_stage

log = logging.getLogger(__name__)
HIRES = "hires"  # the stage; its folder is common.keys.HIRES_ROOT
_RANGE = re.compile(r"/(\d+)(?:-[^/]*)?\.safetensors$")  # data/shards/<i>[-<W>x<H>][-dedup].safetensors


class HiresError(DDMError):
    """The continuation cannot start from the base stage as committed (one line, nothing deleted)."""


def hires_store(store: RunStore) -> RunStore:
    return store.child(HIRES_ROOT)


def listing_range(ref: ShardRef) -> int:
    """The listing range i of a data shard: shard i holds listing positions [i R, (i + 1) R)."""
    match = _RANGE.search(ref.path)
    if match is None:
        raise HiresError(f"{ref.path}: not a data shard name")
    return int(match.group(1))


def base_clusters(store: RunStore, ds: DatasetManifest, clusters: ClusterManifest, i: int) -> dict[int, int]:
    """{listing position: cluster} of the base rows of listing range i (every bucket's shard of it)."""
    out: dict[int, int] = {}
    for ref, aref in zip(ds.shards, clusters.assignments):
        if listing_range(ref) == i:
            with safe_open(store.local_copy(ref), "pt") as f:
                index = f.get_tensor("index")
            out.update(zip(index.tolist(), st_load(store.get_payload(aref))["cluster"].tolist()))
    return out


def cut_partitions(config: RunConfig, store: RunStore, sub: RunStore) -> list[int]:
    """Each expert's and the router's partition of the hires data, by the base clusters; returns the sizes.
    Cut once: committed manifests mean done (they are written last)."""
    from worker.partition import PartitionTotals, _clear, assign_shard

    k = config.clustering.num_experts
    names = [manifest_key(job_prefix(job_name(e))) for e in range(k)] + [manifest_key(ROUTER), "clusters/clusters.json"]
    if all(sub.exists(name) for name in names):
        from common.manifests import ExpertManifest

        return [sub.read_record(names[e], ExpertManifest).rows for e in range(k)]
    ds = store.read_record("data/dataset.json", DatasetManifest)
    clusters = store.read_record("clusters/clusters.json", ClusterManifest)
    hires = sub.read_record("data/dataset.json", DatasetManifest)
    if ds is None or clusters is None or hires is None:
        raise HiresError("hires: the base data, the base clusters or the hires data are not committed")
    _clear(sub)
    totals = PartitionTotals(k, hires.feature_dim)
    cached: tuple[int, dict[int, int]] = (-1, {})
    for i, ref in enumerate(hires.shards):
        r = listing_range(ref)
        if cached[0] != r:
            cached = (r, base_clusters(store, ds, clusters, r))
        with safe_open(sub.local_copy(ref), "pt") as f:
            index = f.get_tensor("index").tolist()
        missing = [pos for pos in index if pos not in cached[1]]
        if missing:
            raise HiresError(f"hires: {len(missing)} rows of {ref.path} (listing position {missing[0]}, ...) have no "
                             f"base cluster; the source changed since the base stage")
        cluster = torch.tensor([cached[1][pos] for pos in index], dtype=torch.long)
        totals.add(assign_shard(sub, hires, i, k, config.clustering.metric, config.clustering.assign_chunk_rows,
                                cluster=cluster))
    totals.commit_partitions(sub, hires)
    sizes = totals.sizes.tolist()
    # The base clustering, restated for the hires rows: `ddm eval` reads the router's targets from it.
    centroids = store.copy_payload(clusters.centroids, sub, clusters.centroids.path)
    sub.commit("clusters/clusters.json", clusters.model_copy(update={
        "sizes": sizes, "centroids": centroids, "assignments": totals.assignments, "report": None, "images": []}))
    return sizes


def seed_inits(store: RunStore, sub: RunStore, names: list[str]) -> None:
    """Copy each job's base export into its hires folder and commit `init.json` (a record like export.json)."""
    for name in names:
        prefix = job_prefix(name)
        if sub.exists(init_key(prefix)):
            continue
        base = store.read_record(export_key(prefix), ExportRecord)
        if base is None:
            raise HiresError(f"hires: {prefix}/export.json is not committed; the continuation starts from every "
                             f"base export (an expert that failed for good has none)")
        folder = f"{prefix}/init/{base.weights.path.split('/')[-2]}"  # the export's own token
        weights = store.copy_payload(base.weights, sub, f"{folder}/{base.weights.path.split('/')[-1]}")
        config = store.copy_payload(base.model_config_file, sub, f"{folder}/{base.model_config_file.path.split('/')[-1]}")
        sub.commit(init_key(prefix), base.model_copy(update={"weights": weights, "model_config_file": config}))


def run_hires_stage(config: RunConfig, store: RunStore, fingerprint: str, make_group: Callable[[dict], WorkerGroup],
                    source_fingerprint: str | None = None, listener: Callable[[JobState], None] | None = None,
                    on_tick: Callable[[], None] | None = None, inputs: dict | None = None) -> StageResult:
    """Prepare at hires.image_size, cut the base partitions, then train every job on from its base export."""
    from worker.prepare import prepare_data

    hires_config = config.hires_run_config()
    sub = hires_store(store)
    prepared = prepare_data(hires_config, sub, source_fingerprint)
    sizes = cut_partitions(config, store, sub)
    names = [job_name(e) for e in range(config.clustering.num_experts)] + [ROUTER]
    seed_inits(store, sub, names)
    trained = run_train_stage(hires_config, sub, fingerprint, make_group, listener=listener, on_tick=on_tick,
                              inputs=inputs, stage=HIRES)
    hires_ds = sub.read_record("data/dataset.json", DatasetManifest)
    return StageResult(
        counts={"used": prepared.counts["used"], "quarantined": prepared.counts["quarantined"],
                **{f"size_{e}": s for e, s in enumerate(sizes)}, **trained.counts},
        details={**trained.details, "image_size": hires_config.data.image_size,
                 "latent_shape": hires_ds.latent_shape if hires_ds else None,
                 "prepare": {k: prepared.details.get(k) for k in ("resumed_shards", "listing_s", "first_shard_s",
                                                                  "steady_img_per_s")}})


__all__ = ["HIRES", "hires_store", "run_hires_stage", "cut_partitions", "seed_inits", "HiresError"]

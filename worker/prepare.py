"""The prepare stage: list -> read + decode safely -> encode -> immutable shards + dataset.json, as a
Ray Data pipeline when Ray is initialised (local mode starts the local Ray for this stage).

    listing       `discover` (fsspec) on the driver; shard i = listing positions [i R, (i + 1) R)
    read + decode Ray Data map_batches tasks, one shard range per call (worker/prepare_decode.py)
    encode        an actor pool (prepare.num_workers actors, capped by the cluster's CPUs, and by its
                  GPUs with prepare.use_gpu); each actor builds its encoders once, writes its shards to
                  the run store and commits data/parts/<i>.json; the driver receives only those records
    dataset       the driver drops duplicates across shards (first in listing order wins; a shard
                  holding one is rewritten as <i>-dedup), then commits data/dataset.json

Store layout written here (docs/data_plane.md):
    data/shards/<i:05d>.safetensors   latents [N,C,H,W] bf16 (latents.store_dtype), features [N,D] f32,
                                      labels [N] i64 (-1 = unlabelled), index [N] i64 (listing
                                      position), thumbs [N,h,w,c] u8, text_pooled [N,Dt] /
                                      text_tokens [N,L,Dt] with a text encoder
    data/shards/<i:05d>-<W>x<H>.safetensors  the same, with data.buckets: the rows of range i in bucket
                                      W x H pixels (one shard per bucket present; a shard never mixes shapes)
    data/captions/<i:05d>.jsonl       {"index", "caption"} per row, when data.captions
    data/keys/<i:05d>.jsonl           {"index", "key"} per row: the source key (relative path, shard:member or
                                      builtin#i), so every partition row traces back to its file
    data/holdout/<i:05d>[-<W>x<H>].safetensors  the held-out rows of that data shard (data.holdout_fraction;
                                      heldout_mask), written by the same worker
    data/parts/<i:05d>.json           PreparedShard: the worker's record of shard i
    data/quarantine.jsonl             {"source", "reason"} per item not used (always written)
    data/dataset.json                 DatasetManifest, committed LAST

A prepare stopped midway resumes: parts committed under the same plan (config sections + listing) are
kept and their ranges skipped. Without Ray, or for a single shard, the same functions run in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.buckets import Bucket
from common.config import ConfigError, RunConfig
from common.errors import DataError
from common.manifests import DatasetManifest, FileRef, PreparedShard, QuarantineEntry, ShardRef, StageResult
from common.storage import RunStore
from worker.encoders import PixelFeatures, vae_config, vae_scale
from worker.prepare_decode import decode_batch, decode_items
from worker.prepare_shard import ShardEncoder, part_key, shard_name, write_holdout
from worker.sources import Discovery, Item, discover

log = logging.getLogger(__name__)
PLAN_SECTIONS = ("seed", "data", "features", "latents", "text")  # what a shard's bytes depend on
PCA_FIT_ROWS = 8192


STEADY_MIN_SHARDS = 4  # fewer shards after the first: their arrival gaps say nothing about a rate


def plan_id(config: RunConfig, items: list[Item], source_fingerprint: str | None = None) -> str:
    """What decides every shard's bytes: the output-changing config sections, the items, and the source's
    content listing (worker/listing.py) when the stage has one, so an edited file changes the plan."""
    h = hashlib.sha256(config.fingerprint(*PLAN_SECTIONS).encode())
    h.update(f"{source_fingerprint}\n".encode())
    for it in items:
        h.update(f"{it.source}\0{it.path}\0{it.offset}\0{it.size}\0{it.label}\0{it.caption}\n".encode())
        if it.array is not None:  # built-ins: the generated content itself
            h.update(hashlib.sha256(np.ascontiguousarray(it.array).tobytes()).digest())
    return h.hexdigest()


def vae_factor(config: RunConfig) -> int:
    """Pixels per latent cell along each side: 1 in pixel space, 2^(down blocks - 1) for a diffusers VAE."""
    if config.latents.encoder != "vae":
        return 1
    cfg = vae_config(config.latents.model, config.latents.subfolder)  # type: ignore[arg-type]
    return 2 ** (len(cfg.get("block_out_channels", [0])) - 1)


def run_buckets(config: RunConfig) -> list[Bucket] | None:
    """The bucket set when data.buckets.enabled (sides multiples of VAE factor x patch size), else None."""
    if not config.data.buckets.enabled:
        return None
    try:
        return config.bucket_sizes(vae_factor(config))
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None


def bucket_summary(shards: list[ShardRef], latent_channels: int, factor: int) -> list[dict[str, Any]]:
    """Per bucket present (bucket order): its pixel size, latent shape, rows and shards."""
    out: dict[Bucket, dict[str, Any]] = {}
    for ref in shards:
        assert ref.bucket is not None
        w, h = ref.bucket
        entry = out.setdefault(ref.bucket, {"bucket": [w, h], "latent_shape": [latent_channels, h // factor, w // factor],
                                            "rows": 0, "shards": 0})
        entry["rows"] += ref.rows
        entry["shards"] += 1
    return [out[b] for b in sorted(out, key=lambda b: (b[0] / b[1], b[0]))]


def fit_pca(config: RunConfig, found: Discovery, buckets: list[Bucket] | None = None
            ) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]:
    """PCA of pixel features on the first PCA_FIT_ROWS decodable items (listing order), fitted once on
    the driver before any shard is written, so every worker projects with the same basis."""
    dim = config.features.pca_dim if config.features.extractor == "pixels" else None
    if not dim:
        return None, {}
    pixels = PixelFeatures(config.features.pixels_size)
    feats, rows = [], 0
    for a in range(0, len(found.items), config.data.shard_rows):
        if rows >= PCA_FIT_ROWS:
            break
        decoded = decode_items(0, a, found.items[a:a + config.data.shard_rows], found.fs, config.data, buckets)
        for _, _, group in decoded.groups():  # features are one fixed-size vector per image, whatever its bucket
            feats.append(pixels(torch.from_numpy(group)).double())
            rows += len(group)
    x = torch.cat(feats)[:PCA_FIT_ROWS]
    mean = x.mean(0)
    var, vecs = torch.linalg.eigh((x - mean).T @ (x - mean))     # D x D covariance: cheap for pixel features
    var, vecs = var.flip(0).clamp_min(0), vecs.flip(1)
    dim = min(dim, len(var))
    pca = (mean.float().numpy(), np.ascontiguousarray(vecs[:, :dim].float().numpy()))
    return pca, {"dim": dim, "fit_rows": len(x), "explained_variance": float(var[:dim].sum() / var.sum())}


def encoder_pool(config: RunConfig, pending: int) -> tuple[int, dict[str, float]]:
    """(actors, resources of each): prepare.num_workers, capped by the shards to do, by the CPUs left
    after one decode task, and with prepare.use_gpu by the cluster's GPUs (an actor that can never be
    placed would stall the pool)."""
    import ray

    pc, total = config.prepare, ray.cluster_resources()
    n = min(pc.num_workers, pending, max(1, int((total.get("CPU", 1) - pc.decode_cpus) / pc.encoder_cpus)))
    if pc.use_gpu:
        gpus = int(total.get("GPU", 0))
        if gpus < 1:
            raise ConfigError("prepare.use_gpu = true but the Ray cluster has no GPU")
        if gpus < n:
            log.info("prepare: %d encoder actors asked, the cluster has %d GPU(s): using %d", n, gpus, gpus)
        n = min(n, gpus)
    return n, {"num_cpus": pc.encoder_cpus, "num_gpus": 1.0 if pc.use_gpu else 0.0}


def run_shards(config: RunConfig, store: RunStore, found: Discovery, pending: list[int], plan: str,
               pca: tuple[np.ndarray, np.ndarray] | None, buckets: list[Bucket] | None = None) -> Iterator[PreparedShard]:
    """Decode, encode and write the pending shards; yields each worker's record (in completion order)."""
    import ray

    R, items = config.data.shard_rows, found.items
    encoder_args = (store, plan, config.seed, config.data, config.features, config.latents, config.text, pca)
    # One shard: actors would only add start-up time. memory:// lives in this process: only it can write there.
    if not ray.is_initialized() or len(pending) < 2 or store.protocol == "memory":
        encoder = ShardEncoder(*encoder_args)
        for i in pending:
            yield encoder.write(decode_items(i, i * R, items[i * R:(i + 1) * R], found.fs, config.data, buckets))
        return
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False
    n, resources = encoder_pool(config, len(pending))
    log.info("prepare: %d shards on Ray Data, %d encoder actor(s) %s", len(pending), n, resources)
    rows = [{"shard": i, "start": i * R, "items": pickle.dumps(items[i * R:(i + 1) * R])} for i in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(decode_batch, batch_size=1, fn_kwargs={"fs": found.fs, "data": config.data, "buckets": buckets},
                        num_cpus=config.prepare.decode_cpus)
    pool = ActorPoolStrategy(min_size=1, max_size=n, max_tasks_in_flight_per_actor=1) if config.prepare.use_gpu \
        else ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=2)
    ds = ds.map_batches(ShardEncoder, batch_size=1, fn_constructor_args=encoder_args, compute=pool, **resources)
    for row in ds.iter_rows():
        yield PreparedShard.model_validate_json(row["record"])


def kept_parts(store: RunStore, plan: str) -> dict[int, PreparedShard]:
    """Parts committed by an earlier attempt of the same plan; everything else under data/ is removed."""
    store.delete("data/dataset.json")  # first: nobody trusts the rest while it changes
    kept: dict[int, PreparedShard] = {}
    for key in store.list("data/parts"):
        try:
            part = store.read_record(key, PreparedShard)
        except ValueError:
            continue
        if part is not None and part.plan == plan and key == part_key(part.shard):
            kept[part.shard] = part
    if not kept:
        store.delete("data")
        return kept
    keep = {part_key(i) for i in kept} | {r.path for p in kept.values()
                                          for r in (*p.payloads(), *(p.holdout or ()), p.captions, p.keys) if r}
    for key in store.list("data"):
        if key not in keep and "-dedup." not in key:  # dedup rewrites are reproduced byte for byte
            store.delete(key)
    return kept


Final = tuple[ShardRef, FileRef | None, FileRef | None]  # a shard's data, captions and keys sidecars


def drop_duplicates(config: RunConfig, store: RunStore, parts: list[PreparedShard], items: list[Item]
                    ) -> tuple[list[Final], list[ShardRef], list[tuple[int, str]]]:
    """First occurrence in listing order wins (data.duplicate_policy = quarantine). Returns each shard's
    final (data, captions, keys), the final held-out shards, and the (position, reason) of every item not used."""
    first: dict[str, int] = {}
    out, held, quarantined = [], [], []
    for part in parts:
        quarantined += [tuple(q) for q in part.quarantined]
        drop = set()
        for pos, digest in zip(part.used, part.digests):
            if digest and digest in first and config.data.duplicate_policy == "quarantine":
                drop.add(pos)
                quarantined.append((pos, f"duplicate: same sha256 as {items[first[digest]].source}"))
            elif digest:
                first.setdefault(digest, pos)
        payloads = part.payloads()
        if not payloads or len(drop) == sum(r.rows for r in payloads):
            continue
        if drop:
            out += _rewrite(store, part, drop)
            held += [ref for src in part.holdout or () if (ref := _without(store, src, drop, "holdout")) is not None]
        else:  # the range's sidecars (keyed by row index) go with its first shard
            out += [(ref, part.captions, part.keys) if j == 0 else (ref, None, None) for j, ref in enumerate(payloads)]
            held += part.holdout or []
    return out, held, sorted(quarantined)


def _without(store: RunStore, src: ShardRef, drop: set[int], folder: str) -> ShardRef | None:
    """Shard `src` without the rows at listing positions `drop`, as data/<folder>/<name>-dedup.safetensors;
    None when no row is left."""
    tensors = st_load(store.get_payload(src))
    keep = torch.tensor([p not in drop for p in tensors["index"].tolist()])
    if not keep.any():
        return None
    ref = store.put_payload(f"data/{folder}/{shard_name(src)}-dedup.safetensors",
                            st_save({k: v[keep].contiguous() for k, v in tensors.items()}))
    return ShardRef(**ref.model_dump(), rows=int(keep.sum()), bucket=src.bucket)


def driver_holdout(store: RunStore, part: PreparedShard, fraction: float, seed: int) -> list[ShardRef]:
    """The held-out rows of a part's data shards, written by the driver (for a part whose worker did not)."""
    refs = [write_holdout(store, shard_name(src), st_load(store.get_payload(src)), fraction, seed, src.bucket)
            for src in part.payloads()]
    return [ref for ref in refs if ref is not None]


def _rewrite(store: RunStore, part: PreparedShard, drop: set[int]) -> list[Final]:
    """The shard(s) of `part` (and its sidecars) without the rows at listing positions `drop`, as
    <i>-dedup or <i>-<W>x<H>-dedup (rare); a bucket shard left with no row is dropped."""
    out: list[Final] = [(ref, None, None) for src in part.payloads() if (ref := _without(store, src, drop, "shards")) is not None]

    def sidecar(src: FileRef | None, folder: str) -> FileRef | None:
        if src is None:
            return None
        lines = [ln for ln in store.get_payload(src).decode().splitlines(True) if json.loads(ln)["index"] not in drop]
        return store.put_payload(f"data/{folder}/{part.shard:05d}-dedup.jsonl", "".join(lines).encode())

    out[0] = (out[0][0], sidecar(part.captions, "captions"), sidecar(part.keys, "keys"))
    return out


def prepare_data(config: RunConfig, store: RunStore, source_fingerprint: str | None = None,
                 listed: dict[str, int] | None = None) -> StageResult:
    """Decode, encode and write the dataset; returns {discovered, used, quarantined, shards}.
    `source_fingerprint` and `listed` ({key: size}): the content listing's, when the caller has one (the
    pipeline passes the listing it commits, so discovery does not walk the source again)."""
    t0 = time.perf_counter()
    found = discover(config.data, config.seed, listed)
    items, R = found.items, config.data.shard_rows
    discovered_at = time.perf_counter()
    plan = plan_id(config, items, source_fingerprint)
    kept = kept_parts(store, plan)
    buckets = run_buckets(config)
    pending = [i for i in range(-(-len(items) // R)) if i not in kept]
    if kept:
        log.info("prepare: resuming, %d of %d shards already committed", len(kept), len(kept) + len(pending))
    for part in kept.values():
        if part.holdout is None:  # its worker left the held-out rows to the driver: written here, the same bytes on every resume
            part.holdout = driver_holdout(store, part, config.data.holdout_fraction, config.seed)
    pca, pca_info = fit_pca(config, found, buckets)
    parts = dict(kept)
    first = last = time.perf_counter()
    for done, part in enumerate(run_shards(config, store, found, pending, plan, pca, buckets), 1):
        parts[part.shard] = part
        first, last = (time.perf_counter() if done == 1 else first), time.perf_counter()
        if done % 10 == 0 or done == len(pending):
            log.info("prepare: %d / %d shards written", done, len(pending))
    ordered = [parts[i] for i in sorted(parts)]
    shards, held, quarantined = drop_duplicates(config, store, ordered, items)

    quarantine = [QuarantineEntry(source=items[pos].source, reason=reason) for pos, reason in quarantined]
    qref = store.put_payload("data/quarantine.jsonl", "".join(q.model_dump_json() + "\n" for q in quarantine).encode())
    used = sum(s.rows for s, _, _ in shards)
    if len(items) != used + len(quarantine):
        raise AssertionError(f"prepare: discovered {len(items)} != used {used} + quarantined {len(quarantine)}")
    if used == 0:
        raise DataError(f"data.source {config.data.source}: none of the {len(items)} discovered items is usable "
                         f"(reasons in data/quarantine.jsonl)")
    scale: dict[str, float] = {}
    if config.latents.encoder == "vae":
        scale = vae_scale(vae_config(config.latents.model, config.latents.subfolder))  # type: ignore[arg-type]
    extra = dict(found.extra)
    if pca_info:
        extra["pca"] = pca_info
    if config.data.captions:
        extra["captions"] = [c.model_dump() for _, c, _ in shards if c is not None]
    extra["keys"] = [k.model_dump() for _, _, k in shards if k is not None]
    extra["holdout"] = {"fraction": config.data.holdout_fraction, "seed": config.seed, "rows": sum(r.rows for r in held),
                        "shards": [r.model_dump() for r in held], "rule": "worker.prepare_shard.heldout_mask(index, fraction, seed)"}
    shape = next(p.shapes for p in ordered if p.shapes)
    if buckets is not None:  # per-bucket rows; the dataset's latent shape is the most populous bucket's
        extra["buckets"] = bucket_summary([s for s, _, _ in shards], shape["latents"][0], vae_factor(config))
        shape = {**shape, "latents": max(extra["buckets"], key=lambda b: b["rows"])["latent_shape"]}
    labels_known = config.data.label_source != "none"
    manifest = DatasetManifest(
        source=config.data.source, discovered=len(items), used=used, quarantined=len(quarantine),
        latent_shape=shape["latents"], feature_dim=shape["features"][0],
        num_classes=found.num_classes if labels_known else None,
        text_dim=shape["text_pooled"][0] if "text_pooled" in shape else None, latent_scale=scale,
        latent_dtype=config.latents.store_dtype, shards=[s for s, _, _ in shards], quarantine=qref, extra=extra)
    store.commit("data/dataset.json", manifest)
    kinds: dict[str, int] = {}
    for q in quarantine:
        kinds[q.reason.split(":")[0]] = kinds.get(q.reason.split(":")[0], 0) + 1
    log.info("prepare: %d discovered = %d used + %d quarantined %s", len(items), used, len(quarantine), kinds)
    return StageResult(
        counts={"discovered": len(items), "used": used, "quarantined": len(quarantine), "shards": len(shards)},
        outputs=[FileRef(path=s.path, sha256=s.sha256, size=s.size) for s, _, _ in shards] + [qref],
        details={"quarantine_reasons": kinds, "latent_shape": shape["latents"], "feature_dim": shape["features"][0],
                 "encode_processes": sorted({p.encoder_pid for p in parts.values() if p.shard in pending}),
                 "resumed_shards": len(kept), "listing_s": round(discovered_at - t0, 3),
                 "first_shard_s": round(first - t0, 3),  # listing + pipeline start-up (worker processes)
                 # rows after the first shard over their time: a rate only where several shards follow the first
                 "steady_img_per_s": round(sum(parts[i].stop - parts[i].start for i in pending[1:]) / (last - first), 1)
                 if len(pending) > STEADY_MIN_SHARDS and last > first else None})

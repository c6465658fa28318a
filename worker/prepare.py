"""The prepare stage: discover -> read + decode safely -> encode -> immutable shards + dataset.json.

Store layout written here (docs/design.md §4):
    data/shards/<i:05d>.safetensors   latents [N,C,H,W] f32, features [N,D] f32, labels [N] i64 (-1 =
                                      unlabelled), index [N] i64 (global row), thumbs [N,h,w,c] u8,
                                      text_pooled [N,Dt] / text_tokens [N,L,Dt] with a text encoder
    data/captions/<i:05d>.jsonl       {"index", "caption"} per row, when data.captions
    data/keys/<i:05d>.jsonl           {"index", "key"} per row: the source key (relative path, shard:member or
                                      builtin#i), so every partition row traces back to its file
    data/holdout/<i:05d>.safetensors  the held-out rows of shard i (data.holdout_fraction; heldout_mask)
    data/quarantine.jsonl             {"source", "reason"} per item not used (always written)
    data/dataset.json                 DatasetManifest, committed LAST

Decoding and encoding run on Ray actors when Ray is initialised and there is more than one batch
(one encoder set per actor, built once), in this process otherwise. Results come back in discovery order, so shards, the duplicate
check (first occurrence wins) and row indices are deterministic whatever the parallelism.
"""

from __future__ import annotations

from common.config import ConfigError
from common.errors import DataError

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from common.config import DataConfig, FeaturesConfig, LatentsConfig, RunConfig, TextConfig
from common.manifests import DatasetManifest, FileRef, QuarantineEntry, ShardRef, StageResult
from common.storage import RunStore
from worker.decode import Quarantined, check_file_size, decode_caption, decode_image
from worker.encoders import Encoders, vae_config, vae_scale
from worker.sources import Item, discover, read_item

log = logging.getLogger(__name__)
THUMB_SIZE = 32
PCA_FIT_ROWS = 8192


@dataclass
class BatchOut:
    """One encoded batch: per-item status (None = used) and the arrays of the used rows, in order."""
    reasons: list[str | None]
    hashes: list[str | None]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    captions: list[str | None] = field(default_factory=list)
    pid: int = 0  # the process that encoded it (Ray actors report theirs)


def _thumbs(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, h, w, C], at most THUMB_SIZE pixels a side."""
    if x.shape[-1] > THUMB_SIZE:
        x = F.interpolate(x, size=(THUMB_SIZE, THUMB_SIZE), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def process_batch(items: list[Item], fs: Any, data: DataConfig, encoders: Encoders) -> BatchOut:
    """Read, decode and encode one batch; a bad item is reported, never raised."""
    reasons: list[str | None] = []
    hashes: list[str | None] = []
    pixels, captions = [], []
    for item in items:
        try:
            if item.array is not None:
                x, caption, digest = item.array, item.text, None
            else:
                check_file_size(item.size, data.max_file_bytes)
                try:
                    raw, cap = read_item(fs, item)
                except Exception as exc:  # noqa: BLE001 - a storage error on one file is that file's problem
                    raise Quarantined(f"read_error: {type(exc).__name__}: {exc}") from None
                check_file_size(len(raw), data.max_file_bytes)
                digest = hashlib.sha256(raw).hexdigest()
                caption = decode_caption(cap, item.caption[3]) if item.caption else None
                img = decode_image(raw, data.image_size, data.channels, data.max_image_pixels)
                x = img.transpose(2, 0, 1) * 2.0 - 1.0                         # [C, H, W] in [-1, 1]
        except Quarantined as q:
            reasons.append(q.reason)
            hashes.append(None)
            continue
        reasons.append(None)
        hashes.append(digest)
        pixels.append(np.asarray(x, dtype=np.float32))
        captions.append(caption)
    out = BatchOut(reasons, hashes, captions=captions, pid=os.getpid())
    if pixels:
        x = torch.from_numpy(np.stack(pixels))                                  # [B, C, H, W]
        out.arrays = encoders(x, captions)
        out.arrays["thumbs"] = _thumbs(x)
        out.arrays["labels"] = np.asarray([it.label for it, r in zip(items, reasons) if r is None], dtype=np.int64)
    return out


class EncodeWorker:
    """Holds one set of encoders; used in-process or as a Ray actor."""

    def __init__(self, data: DataConfig, features: FeaturesConfig, latents: LatentsConfig, text: TextConfig,
                 fs: Any) -> None:
        self.data, self.fs = data, fs
        self.encoders = Encoders(features, latents, text)

    @torch.no_grad()  # scoped, not global: this also runs inside the driver's process
    def process(self, items: list[Item]) -> BatchOut:
        return process_batch(items, self.fs, self.data, self.encoders)


def _encode_all(config: RunConfig, fs: Any, batches: list[list[Item]]) -> Iterator[BatchOut]:
    args = (config.data, config.features, config.latents, config.text, fs)
    import ray

    if not ray.is_initialized() or len(batches) < 2:  # one batch: actors would only add startup time
        worker = EncodeWorker(*args)
        yield from (worker.process(b) for b in batches)
        return
    from ray.util import ActorPool

    resources = ray.cluster_resources()
    if config.prepare.use_gpu and resources.get("GPU", 0) < 1:
        raise ConfigError("prepare.use_gpu = true but the Ray cluster has no GPU")
    n = max(1, min(config.prepare.num_workers, len(batches), int(resources.get("CPU", 1))))
    actor_cls = ray.remote(num_cpus=1, num_gpus=1 if config.prepare.use_gpu else 0)(EncodeWorker)
    actors = [actor_cls.remote(*args) for _ in range(n)]
    log.info("prepare: encoding %d batches on %d Ray actors", len(batches), n)
    try:
        yield from ActorPool(actors).map(lambda a, b: a.process.remote(b), batches)
    finally:
        for actor in actors:
            ray.kill(actor)


class ShardWriter:
    """Buffers encoded rows and writes fixed-size immutable shards; fits the optional PCA of pixel
    features on the first PCA_FIT_ROWS rows before the first shard is written."""

    def __init__(self, store: RunStore, config: RunConfig) -> None:
        self.store, self.rows = store, config.data.shard_rows
        self.captions_on = config.data.captions
        self.pca_dim = config.features.pca_dim if config.features.extractor == "pixels" else None
        self.pca: tuple[np.ndarray, np.ndarray] | None = None
        self.pca_info: dict[str, Any] = {}
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.written = 0
        self.shards: list[ShardRef] = []
        self.caption_refs: list[dict] = []
        self.key_refs: list[dict] = []
        self.shape: dict[str, list[int]] = {}

    def add(self, arrays: dict[str, np.ndarray], captions: list[str | None], keys: list[str]) -> None:
        n = len(arrays["labels"])
        arrays = dict(arrays, _captions=np.asarray(captions, dtype=object), _keys=np.asarray(keys, dtype=object))
        self.buffer.append(arrays)
        self.buffered += n
        self._flush(final=False)

    def _fit_pca(self) -> None:
        feats = np.concatenate([b["features"] for b in self.buffer])[:PCA_FIT_ROWS].astype(np.float64)
        mean = feats.mean(0)
        centred = torch.from_numpy(feats - mean)
        var, vecs = torch.linalg.eigh(centred.T @ centred)      # D x D covariance: cheap for pixel features
        var, vecs = var.flip(0).clamp_min(0).numpy(), vecs.flip(1).numpy()
        dim = min(self.pca_dim, len(var))
        self.pca = (mean.astype(np.float32), np.ascontiguousarray(vecs[:, :dim], dtype=np.float32))
        self.pca_info = {"dim": dim, "fit_rows": len(feats), "explained_variance": float(var[:dim].sum() / var.sum())}

    def _flush(self, final: bool) -> None:
        if self.pca_dim and self.pca is None:
            if self.buffered < PCA_FIT_ROWS and not final:
                return
            if self.buffered:
                self._fit_pca()
        while self.buffered >= self.rows or (final and self.buffered):
            merged = {k: np.concatenate([b[k] for b in self.buffer]) for k in self.buffer[0]}
            take = min(self.rows, self.buffered)
            shard = {k: v[:take] for k, v in merged.items()}
            rest = {k: v[take:] for k, v in merged.items()}
            self.buffer, self.buffered = ([rest], self.buffered - take) if self.buffered > take else ([], 0)
            self._write(shard)

    def _write(self, shard: dict[str, np.ndarray]) -> None:
        i, n = len(self.shards), len(shard["labels"])
        captions, keys = shard.pop("_captions"), shard.pop("_keys")
        if self.pca is not None:
            mean, proj = self.pca
            shard["features"] = (shard["features"] - mean) @ proj
        shard["index"] = np.arange(self.written, self.written + n, dtype=np.int64)
        shard = {k: np.ascontiguousarray(v) for k, v in shard.items()}
        self.shape = {k: list(v.shape[1:]) for k, v in shard.items()}
        ref = self.store.put_payload(f"data/shards/{i:05d}.safetensors", save_safetensors(shard))
        self.shards.append(ShardRef(**ref.model_dump(), rows=n))
        lines = "".join(json.dumps({"index": int(j), "key": str(k)}) + "\n" for j, k in zip(shard["index"], keys))
        self.key_refs.append(self.store.put_payload(f"data/keys/{i:05d}.jsonl", lines.encode()).model_dump())
        if self.captions_on:
            lines = "".join(json.dumps({"index": int(j), "caption": c}) + "\n" for j, c in zip(shard["index"], captions))
            self.caption_refs.append(self.store.put_payload(f"data/captions/{i:05d}.jsonl", lines.encode()).model_dump())
        self.written += n

    def close(self) -> None:
        self._flush(final=True)


# ---- held-out evaluation split (self-contained: a row's membership depends on its index alone) ----------
def heldout_mask(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows held out for evaluation: a seeded splitmix64 hash of the global row index,
    mapped to [0, 1), below `fraction`. Decided row by row, so any order or parallelism agrees."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as the hash intends
        x = np.asarray(index, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def write_holdout(store: RunStore, shards: list[ShardRef], fraction: float, seed: int) -> dict[str, Any]:
    """Copy the held-out rows of each data shard to data/holdout/<i>.safetensors (all tensors). The
    cluster stage skips the same rows (heldout_mask), so no expert, router or k-means fit sees them."""
    from safetensors.numpy import load_file

    refs, rows = [], 0
    for i, ref in enumerate(shards):
        tensors = load_file(str(store.local_copy(ref)))
        mask = heldout_mask(tensors["index"], fraction, seed)
        if mask.any():
            part = {k: np.ascontiguousarray(v[mask]) for k, v in tensors.items()}
            out = store.put_payload(f"data/holdout/{i:05d}.safetensors", save_safetensors(part))
            refs.append(ShardRef(**out.model_dump(), rows=int(mask.sum())).model_dump())
            rows += int(mask.sum())
    return {"fraction": fraction, "seed": seed, "rows": rows, "shards": refs,
            "rule": "worker.prepare.heldout_mask(index, fraction, seed)"}


def clear_outputs(store: RunStore, prefix: str, record: str) -> None:
    """Remove a previous (stale or half-written) output: the record first, so nobody trusts the rest."""
    store.delete(record)
    store.delete(prefix)


def prepare_data(config: RunConfig, store: RunStore) -> StageResult:
    """Discover, decode, encode and write the dataset; returns {discovered, used, quarantined, shards}."""
    found = discover(config.data, config.seed)
    items = found.items
    clear_outputs(store, "data", "data/dataset.json")
    bs = max(config.features.batch_size, config.latents.batch_size)
    batches = [items[a:a + bs] for a in range(0, len(items), bs)]
    writer = ShardWriter(store, config)
    quarantine: list[QuarantineEntry] = []
    first_seen: dict[str, str] = {}
    scale: dict[str, float] = {}
    pids: set[int] = set()
    with tqdm(total=len(items), desc="prepare", unit="img", mininterval=1.0) as bar:
        for batch, out in zip(batches, _encode_all(config, found.fs, batches)):
            pids.add(out.pid)
            keep = []
            for item, reason, digest in zip(batch, out.reasons, out.hashes):
                if reason is None:
                    dup = first_seen.get(digest) if digest else None
                    if dup is not None and config.data.duplicate_policy == "quarantine":
                        reason = f"duplicate: same sha256 as {dup}"
                    elif digest:
                        first_seen.setdefault(digest, item.source)
                    keep.append(reason is None)
                if reason is not None:
                    quarantine.append(QuarantineEntry(source=item.source, reason=reason))
            if out.arrays and any(keep):
                rows = np.asarray(keep)
                sources = [item.source for item, reason in zip(batch, out.reasons) if reason is None]
                writer.add({k: v[rows] for k, v in out.arrays.items()},
                           [c for c, k in zip(out.captions, keep) if k], [s for s, k in zip(sources, keep) if k])
            bar.update(len(batch))
    writer.close()

    qtext = "".join(q.model_dump_json() + "\n" for q in quarantine)
    qref = store.put_payload("data/quarantine.jsonl", qtext.encode())
    used = writer.written
    if len(items) != used + len(quarantine):
        raise AssertionError(f"prepare: discovered {len(items)} != used {used} + quarantined {len(quarantine)}")
    if used == 0:
        raise DataError(f"data.source {config.data.source}: none of the {len(items)} discovered items is usable "
                         f"(reasons in data/quarantine.jsonl)")
    if config.latents.encoder == "vae":
        scale = vae_scale(vae_config(config.latents.model, config.latents.subfolder))  # type: ignore[arg-type]
    extra = dict(found.extra)
    if writer.pca_info:
        extra["pca"] = writer.pca_info
    if writer.caption_refs:
        extra["captions"] = writer.caption_refs
    extra["keys"] = writer.key_refs
    extra["holdout"] = write_holdout(store, writer.shards, config.data.holdout_fraction, config.seed)
    labels_known = config.data.label_source != "none"
    manifest = DatasetManifest(
        source=config.data.source, discovered=len(items), used=used, quarantined=len(quarantine),
        latent_shape=writer.shape["latents"], feature_dim=writer.shape["features"][0],
        num_classes=found.num_classes if labels_known else None,
        text_dim=writer.shape["text_pooled"][0] if "text_pooled" in writer.shape else None,
        latent_scale=scale, shards=writer.shards, quarantine=qref, extra=extra)
    store.commit("data/dataset.json", manifest)
    kinds: dict[str, int] = {}
    for q in quarantine:
        kinds[q.reason.split(":")[0]] = kinds.get(q.reason.split(":")[0], 0) + 1
    log.info("prepare: %d discovered = %d used + %d quarantined %s", len(items), used, len(quarantine), kinds)
    return StageResult(
        counts={"discovered": len(items), "used": used, "quarantined": len(quarantine), "shards": len(writer.shards)},
        outputs=[FileRef(path=s.path, sha256=s.sha256, size=s.size) for s in writer.shards] + [qref],
        details={"quarantine_reasons": kinds, "latent_shape": writer.shape["latents"],
                 "feature_dim": writer.shape["features"][0], "encode_processes": sorted(pids)})

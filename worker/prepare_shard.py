"""One shard of the prepare plan, encoded and written by an encoder actor that builds its encoders once
(decoding, a Ray Data map task, is in worker/prepare_decode.py). The actor writes the shard's payloads
to the run store and commits its small `PreparedShard` record; only that record goes to the driver.

Shard i covers listing positions [i R, (i + 1) R) (R = data.shard_rows); its rows are the items of that
range that decode, in listing order, and each row's `index` is its listing position, so a rerun of the
same plan rewrites identical bytes. Quarantine reasons come from worker/decode.py unchanged; duplicates
across the whole dataset are decided by the driver (first occurrence in listing order wins).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from common.config import DataConfig, FeaturesConfig, LatentsConfig, TextConfig
from common.manifests import PreparedShard, ShardRef
from common.storage import RunStore
from worker.prepare_decode import DecodedShard

THUMB_SIZE = 32


def part_key(i: int) -> str:
    return f"data/parts/{i:05d}.json"


def heldout_mask(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows held out for evaluation: a seeded splitmix64 hash of the global row index,
    mapped to [0, 1), below `fraction`. Decided row by row, so any order or parallelism agrees, and the
    cluster stage skips the same rows, so no expert, router or k-means fit sees them."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as the hash intends
        x = np.asarray(index, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def shard_name(ref: ShardRef) -> str:
    """A data shard's name, e.g. 00003 or 00003-24x16: its file name without the suffix."""
    return ref.path.rsplit("/", 1)[1].removesuffix(".safetensors")


def write_holdout(store: RunStore, name: str, tensors: dict[str, torch.Tensor], fraction: float, seed: int,
                  bucket: tuple[int, int] | None) -> ShardRef | None:
    """The held-out rows of data shard `name` (all its tensors) as data/holdout/<name>.safetensors; None
    when it holds none."""
    mask = torch.from_numpy(heldout_mask(tensors["index"].numpy(), fraction, seed)) if fraction else None
    if mask is None or not mask.any():
        return None
    ref = store.put_payload(f"data/holdout/{name}.safetensors", st_save({k: v[mask].contiguous() for k, v in tensors.items()}))
    return ShardRef(**ref.model_dump(), rows=int(mask.sum()), bucket=bucket)


def thumbnails(x: torch.Tensor, square: int | None = None) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, h, w, C], at most THUMB_SIZE pixels a side. `square` (bucketed
    shards): every thumbnail is min(square, THUMB_SIZE) pixels square, so grids of any bucket tile alike."""
    if square is not None:
        x = F.interpolate(x, size=(min(square, THUMB_SIZE),) * 2, mode="area")
    elif x.shape[-1] > THUMB_SIZE:
        x = F.interpolate(x, size=(THUMB_SIZE, THUMB_SIZE), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class ShardEncoder:
    """Encodes decoded shards and writes them; one per Ray actor (or one in-process), encoders built once.
    `pca` = (mean [D], projection [D, d]) of pixel features, fitted by the driver before any shard."""

    def __init__(self, store: RunStore, plan: str, seed: int, data: DataConfig, features: FeaturesConfig,
                 latents: LatentsConfig, text: TextConfig, pca: tuple[np.ndarray, np.ndarray] | None) -> None:
        from worker.encoders import Encoders

        self.store, self.plan, self.seed, self.data, self.latents_cfg, self.pca = store, plan, seed, data, latents, pca
        self.encoders = Encoders(features, latents, text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data map_batches: rows {shard, decoded} -> rows {shard, record (JSON)}."""
        records = [self.write(pickle.loads(d)).model_dump_json() for d in batch["decoded"]]
        return {"shard": batch["shard"], "record": np.array(records, dtype=object)}

    @torch.no_grad()  # scoped, not global: this also runs inside the driver's process
    def encode(self, decoded: DecodedShard, rows: np.ndarray, pixels: np.ndarray, bucketed: bool
               ) -> dict[str, torch.Tensor]:
        """The tensors of the used rows `rows` (positions among them), whose pixels are `pixels`."""
        x = torch.from_numpy(pixels)
        captions = [decoded.captions[j] for j in rows] if decoded.captions else decoded.captions
        arrays = {k: torch.from_numpy(v) for k, v in self.encoders(x, captions).items()}
        if self.pca is not None:
            mean, proj = (torch.from_numpy(a) for a in self.pca)
            arrays["features"] = (arrays["features"] - mean) @ proj
        if self.latents_cfg.store_dtype == "bf16":
            arrays["latents"] = arrays["latents"].to(torch.bfloat16)
        arrays["thumbs"] = torch.from_numpy(thumbnails(x, self.data.image_size if bucketed else None))
        arrays["labels"] = torch.from_numpy(decoded.labels[rows])
        arrays["index"] = torch.tensor(decoded.used, dtype=torch.int64)[torch.from_numpy(rows)]
        return arrays

    def write(self, decoded: DecodedShard) -> PreparedShard:
        i = decoded.shard
        record = PreparedShard(shard=i, plan=self.plan, start=decoded.start, stop=decoded.stop, used=decoded.used,
                               digests=decoded.digests, encoder_pid=os.getpid(),
                               quarantined=[(decoded.start + j, r) for j, r in enumerate(decoded.reasons) if r])
        held: list[ShardRef] = []
        if len(decoded.used):
            for bucket, rows, pixels in decoded.groups():  # one group, or one per bucket: a shard never mixes shapes
                arrays = {k: v.contiguous() for k, v in self.encode(decoded, rows, pixels, bucket is not None).items()}
                record.shapes = record.shapes or {k: list(v.shape[1:]) for k, v in arrays.items()}
                name = f"{i:05d}" if bucket is None else f"{i:05d}-{bucket[0]}x{bucket[1]}"
                ref = ShardRef(**self.store.put_payload(f"data/shards/{name}.safetensors", st_save(arrays)).model_dump(),
                               rows=len(rows), bucket=bucket)
                if bucket is None:
                    record.data = ref
                else:
                    record.bucket_data.append(ref)
                held_out = write_holdout(self.store, name, arrays, self.data.holdout_fraction, self.seed, bucket)
                held += [held_out] if held_out is not None else []
            keys = "".join(json.dumps({"index": j, "key": k}) + "\n" for j, k in zip(decoded.used, decoded.sources))
            record.keys = self.store.put_payload(f"data/keys/{i:05d}.jsonl", keys.encode())
            if self.data.captions:
                lines = "".join(json.dumps({"index": j, "caption": c}) + "\n" for j, c in zip(decoded.used, decoded.captions))
                record.captions = self.store.put_payload(f"data/captions/{i:05d}.jsonl", lines.encode())
        record.holdout = held
        self.store.commit(part_key(i), record)
        return record

"""One shard of the prepare plan: read + safe decode (a Ray Data map task), then encode + write (an
encoder actor that builds its encoders once). The worker writes the shard's payloads to the run store
and commits its small `PreparedShard` record; only that record travels back to the driver.

Shard i covers listing positions [i R, (i + 1) R) (R = data.shard_rows); its rows are the items of that
range that decode, in listing order, and each row's `index` is its listing position, so a rerun of the
same plan rewrites identical bytes. Quarantine reasons come from worker/decode.py unchanged; duplicates
across the whole dataset are decided by the driver (first occurrence in listing order wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from common.config import DataConfig, FeaturesConfig, LatentsConfig, TextConfig
from common.manifests import PreparedShard, ShardRef
from common.storage import RunStore
from worker.decode import Quarantined, check_file_size, decode_caption, decode_image
from worker.sources import Item, read_item

THUMB_SIZE = 32


def part_key(i: int) -> str:
    return f"data/parts/{i:05d}.json"


@dataclass
class DecodedShard:
    """What decoding one range yields: per item a reason (None = used) and the used rows' arrays."""
    shard: int
    start: int
    stop: int
    reasons: list[str | None]
    digests: list[str]                                   # used rows only
    pixels: np.ndarray                                   # [n, C, H, W] float32 in [-1, 1]
    labels: np.ndarray                                   # [n] int64
    captions: list[str | None] = field(default_factory=list)

    @property
    def used(self) -> list[int]:
        return [self.start + j for j, r in enumerate(self.reasons) if r is None]


def decode_items(shard: int, start: int, items: list[Item], fs: Any, data: DataConfig) -> DecodedShard:
    """Read and decode one range; a bad item is reported with its reason, never raised."""
    reasons: list[str | None] = []
    digests, pixels, captions, labels = [], [], [], []
    for item in items:
        try:
            if item.array is not None:
                x, caption, digest = item.array, item.text, ""
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
            continue
        reasons.append(None)
        digests.append(digest)
        pixels.append(np.asarray(x, dtype=np.float32))
        captions.append(caption)
        labels.append(item.label)
    shape = (0, data.channels, data.image_size, data.image_size)
    return DecodedShard(shard, start, start + len(items), reasons, digests,
                        np.stack(pixels) if pixels else np.zeros(shape, np.float32),
                        np.asarray(labels, dtype=np.int64), captions)


def decode_batch(batch: dict[str, np.ndarray], fs: Any, data: DataConfig) -> dict[str, np.ndarray]:
    """Ray Data map_batches: rows {shard, start, items (pickled)} -> rows {shard, decoded (pickled)}."""
    out = [decode_items(int(s), int(a), pickle.loads(t), fs, data)
           for s, a, t in zip(batch["shard"], batch["start"], batch["items"])]
    return {"shard": batch["shard"], "decoded": np.array([pickle.dumps(d) for d in out], dtype=object)}


def thumbnails(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, h, w, C], at most THUMB_SIZE pixels a side."""
    if x.shape[-1] > THUMB_SIZE:
        x = F.interpolate(x, size=(THUMB_SIZE, THUMB_SIZE), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class ShardEncoder:
    """Encodes decoded shards and writes them; one per Ray actor (or one in-process), encoders built once.
    `pca` = (mean [D], projection [D, d]) of pixel features, fitted by the driver before any shard."""

    def __init__(self, store: RunStore, plan: str, data: DataConfig, features: FeaturesConfig,
                 latents: LatentsConfig, text: TextConfig, pca: tuple[np.ndarray, np.ndarray] | None) -> None:
        from worker.encoders import Encoders

        self.store, self.plan, self.data, self.latents_cfg, self.pca = store, plan, data, latents, pca
        self.encoders = Encoders(features, latents, text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data map_batches: rows {shard, decoded} -> rows {shard, record (JSON)}."""
        records = [self.write(pickle.loads(d)).model_dump_json() for d in batch["decoded"]]
        return {"shard": batch["shard"], "record": np.array(records, dtype=object)}

    @torch.no_grad()  # scoped, not global: this also runs inside the driver's process
    def encode(self, decoded: DecodedShard) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(decoded.pixels)
        arrays = {k: torch.from_numpy(v) for k, v in self.encoders(x, decoded.captions).items()}
        if self.pca is not None:
            mean, proj = (torch.from_numpy(a) for a in self.pca)
            arrays["features"] = (arrays["features"] - mean) @ proj
        if self.latents_cfg.store_dtype == "bf16":
            arrays["latents"] = arrays["latents"].to(torch.bfloat16)
        arrays["thumbs"] = torch.from_numpy(thumbnails(x))
        arrays["labels"] = torch.from_numpy(decoded.labels)
        arrays["index"] = torch.tensor(decoded.used, dtype=torch.int64)
        return arrays

    def write(self, decoded: DecodedShard) -> PreparedShard:
        i = decoded.shard
        record = PreparedShard(shard=i, plan=self.plan, start=decoded.start, stop=decoded.stop, used=decoded.used,
                               digests=decoded.digests, encoder_pid=os.getpid(),
                               quarantined=[(decoded.start + j, r) for j, r in enumerate(decoded.reasons) if r])
        if len(decoded.used):
            arrays = {k: v.contiguous() for k, v in self.encode(decoded).items()}
            record.shapes = {k: list(v.shape[1:]) for k, v in arrays.items()}
            ref = self.store.put_payload(f"data/shards/{i:05d}.safetensors", st_save(arrays))
            record.data = ShardRef(**ref.model_dump(), rows=len(decoded.used))
            if self.data.captions:
                lines = "".join(json.dumps({"index": j, "caption": c}) + "\n" for j, c in zip(decoded.used, decoded.captions))
                record.captions = self.store.put_payload(f"data/captions/{i:05d}.jsonl", lines.encode())
        self.store.commit(part_key(i), record)
        return record

"""Read + safe decode of one shard range of the prepare plan: the Ray Data map task. This module
imports no torch, so decode workers start quickly; reasons come from worker/decode.py unchanged."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.buckets import Bucket
from common.config import DataConfig
from worker.decode import Quarantined, bucket_array, check_file_size, decode_caption, decode_image, decode_image_bucketed
from worker.sources import Item, read_item


@dataclass
class DecodedShard:
    """What decoding one range yields: per item a reason (None = used) and the used rows' arrays."""
    shard: int
    start: int
    stop: int
    reasons: list[str | None]
    digests: list[str]                                   # used rows only
    pixels: np.ndarray | list[np.ndarray]                # [n, C, H, W] float32 in [-1, 1]; with buckets n [C, h, w]
    labels: np.ndarray                                   # [n] int64
    captions: list[str | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)     # used rows' source keys (data/keys/<i>.jsonl)
    buckets: list[Bucket] = field(default_factory=list)  # with data.buckets: each used row's (width, height)

    @property
    def used(self) -> list[int]:
        return [self.start + j for j, r in enumerate(self.reasons) if r is None]

    def groups(self) -> list[tuple[Bucket | None, np.ndarray, np.ndarray]]:
        """(bucket, positions among the used rows, pixels [n, C, H, W]) per bucket present, in the order
        of (width / height, width); without buckets one group (None, every row, pixels)."""
        if not self.buckets:
            assert isinstance(self.pixels, np.ndarray)
            return [(None, np.arange(len(self.pixels)), self.pixels)]
        out = []
        for bucket in sorted(set(self.buckets), key=lambda b: (b[0] / b[1], b[0])):
            rows = np.asarray([j for j, b in enumerate(self.buckets) if b == bucket], dtype=np.int64)
            out.append((bucket, rows, np.stack([self.pixels[j] for j in rows])))
        return out


def decode_items(shard: int, start: int, items: list[Item], fs: Any, data: DataConfig,
                 buckets: list[Bucket] | None = None) -> DecodedShard:
    """Read and decode one range; a bad item is reported with its reason, never raised. With `buckets`
    (data.buckets) each image is resized to its nearest bucket instead of the image_size square."""
    reasons: list[str | None] = []
    digests, pixels, captions, labels, sources, row_buckets = [], [], [], [], [], []
    for item in items:
        bucket = None
        try:
            if item.array is not None:
                x, caption, digest = item.array, item.text, ""
                if buckets:
                    hwc, bucket = bucket_array((item.array.transpose(1, 2, 0) + 1) / 2, buckets, data.channels)
                    x = hwc.transpose(2, 0, 1) * 2.0 - 1.0
            else:
                check_file_size(item.size, data.max_file_bytes)
                try:
                    raw, cap = read_item(fs, item)
                except Exception as exc:  # noqa: BLE001 - a storage error on one file is that file's problem
                    raise Quarantined(f"read_error: {type(exc).__name__}: {exc}") from None
                check_file_size(len(raw), data.max_file_bytes)
                digest = hashlib.sha256(raw).hexdigest()
                caption = decode_caption(cap, item.caption[3]) if item.caption else None
                if buckets:
                    img, bucket = decode_image_bucketed(raw, buckets, data.channels, data.max_image_pixels)
                else:
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
        sources.append(item.source)
        if bucket is not None:
            row_buckets.append(bucket)
    shape = (0, data.channels, data.image_size, data.image_size)
    stacked = pixels if buckets else np.stack(pixels) if pixels else np.zeros(shape, np.float32)
    return DecodedShard(shard, start, start + len(items), reasons, digests, stacked,
                        np.asarray(labels, dtype=np.int64), captions, sources, row_buckets)


def decode_batch(batch: dict[str, np.ndarray], fs: Any, data: DataConfig,
                 buckets: list[Bucket] | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches: rows {shard, start, items (pickled)} -> rows {shard, decoded (pickled)}."""
    out = [decode_items(int(s), int(a), pickle.loads(t), fs, data, buckets)
           for s, a, t in zip(batch["shard"], batch["start"], batch["items"])]
    return {"shard": batch["shard"], "decoded": np.array([pickle.dumps(d) for d in out], dtype=object)}

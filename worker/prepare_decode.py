"""Read + safe decode of one shard range of the prepare plan: the Ray Data map task. This module
imports no torch, so decode workers start quickly; reasons come from worker/decode.py unchanged."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import DataConfig
from worker.decode import Quarantined, check_file_size, decode_caption, decode_image
from worker.sources import Item, read_item


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
    sources: list[str] = field(default_factory=list)     # used rows' source keys (data/keys/<i>.jsonl)

    @property
    def used(self) -> list[int]:
        return [self.start + j for j, r in enumerate(self.reasons) if r is None]


def decode_items(shard: int, start: int, items: list[Item], fs: Any, data: DataConfig) -> DecodedShard:
    """Read and decode one range; a bad item is reported with its reason, never raised."""
    reasons: list[str | None] = []
    digests, pixels, captions, labels, sources = [], [], [], [], []
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
        sources.append(item.source)
    shape = (0, data.channels, data.image_size, data.image_size)
    return DecodedShard(shard, start, start + len(items), reasons, digests,
                        np.stack(pixels) if pixels else np.zeros(shape, np.float32),
                        np.asarray(labels, dtype=np.int64), captions, sources)


def decode_batch(batch: dict[str, np.ndarray], fs: Any, data: DataConfig) -> dict[str, np.ndarray]:
    """Ray Data map_batches: rows {shard, start, items (pickled)} -> rows {shard, decoded (pickled)}."""
    out = [decode_items(int(s), int(a), pickle.loads(t), fs, data)
           for s, a, t in zip(batch["shard"], batch["start"], batch["items"])]
    return {"shard": batch["shard"], "decoded": np.array([pickle.dumps(d) for d in out], dtype=object)}

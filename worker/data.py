"""Training data of one job: its manifest's shards, read through its scoped store, cached locally.

The data order is a pure function of (seed, epoch) over the manifest rows, and the position in it is
the number of images seen, so the cursor of a resumed run is just `nimg` (edm2 style).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from common.manifests import ExpertManifest, ManifestError, RouterManifest, ShardRef
from common.storage import RunStore


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (seed, purpose, nimg, ...), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [int(p) >> 32 for p in parts])
               .generate_state(1, np.uint64)[0] >> 1)


@dataclass
class TrainData:
    latents: torch.Tensor                 # [N, C, H, W] float32
    labels: torch.Tensor                  # [N] int64, -1 = unlabelled
    cluster: torch.Tensor | None          # [N] int64 (router only)
    text_tokens: torch.Tensor | None      # [N, L, D]
    latent_shape: list[int]
    num_classes: int | None
    text_dim: int | None
    num_experts: int

    @property
    def rows(self) -> int:
        return self.latents.shape[0]


def _load_shards(store: RunStore, refs: list[ShardRef], names: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Download (verified, cached by sha256) all shards concurrently, then open them."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(refs)))) as pool:
        paths = list(pool.map(store.local_copy, refs))
    shards = []
    for ref, path in zip(refs, paths):
        tensors = load_file(str(path))
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ManifestError(f"{ref.path}: shard lacks tensors {missing}")
        rows = {n: tensors[n].shape[0] for n in tensors}
        if any(r != ref.rows for r in rows.values()):
            raise ManifestError(f"{ref.path}: rows {rows} != manifest rows {ref.rows}")
        shards.append(tensors)
    return shards


def load_partition(store: RunStore, manifest_key: str, kind: str) -> TrainData:
    """An expert's partition (ExpertManifest) or the router's view (RouterManifest + assignments)."""
    cls = RouterManifest if kind == "router" else ExpertManifest
    manifest = store.read_record(manifest_key, cls)
    if manifest is None:
        raise ManifestError(f"{manifest_key}: no committed manifest")
    if not manifest.shards or manifest.rows == 0:
        raise ManifestError(f"{manifest_key}: the partition is empty")
    shards = _load_shards(store, manifest.shards, ("latents", "labels"))
    cat = lambda name: torch.cat([s[name] for s in shards]) if all(name in s for s in shards) else None  # noqa: E731
    latents = cat("latents").float()
    if list(latents.shape[1:]) != list(manifest.latent_shape) or latents.shape[0] != manifest.rows:
        raise ManifestError(f"{manifest_key}: shards hold {list(latents.shape)}, manifest says "
                            f"{manifest.rows} x {manifest.latent_shape}")
    cluster = None
    if kind == "router":
        if len(manifest.assignments) != len(manifest.shards):
            raise ManifestError(f"{manifest_key}: {len(manifest.assignments)} assignment files for {len(manifest.shards)} shards")
        cluster = torch.cat([a["cluster"] for a in _load_shards(store, manifest.assignments, ("cluster",))]).long()
        if cluster.shape[0] != latents.shape[0] or cluster.min() < 0 or cluster.max() >= manifest.num_experts:
            raise ManifestError(f"{manifest_key}: cluster labels do not match the shards or lie outside [0, {manifest.num_experts})")
    return TrainData(latents=latents, labels=cat("labels").long(), cluster=cluster, text_tokens=cat("text_tokens"),
                     latent_shape=list(manifest.latent_shape), num_classes=manifest.num_classes,
                     text_dim=manifest.text_dim, num_experts=manifest.num_experts)


class DataOrder:
    """Rows for images [nimg, nimg + n): epoch e = i // N visits randperm(N; seed, e)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows, self.seed = rows, seed
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch))
            self._perms[epoch] = torch.randperm(self.rows, generator=gen)
        return self._perms[epoch]

    def rows_for(self, nimg: int, n: int) -> torch.Tensor:
        pos = torch.arange(nimg, nimg + n)                                    # [n]
        epochs = pos // self.rows
        out = torch.empty(n, dtype=torch.long)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask] = self.perm(e)[pos[mask] % self.rows]
        return out


def worker_positions(batch: int, micro_batch: int, rank: int, world: int) -> torch.Tensor:
    """Positions inside a step's batch that this worker processes, micro-batch after micro-batch:
    micro-batch m of worker r holds [(m W + r) mb, (m W + r + 1) mb). Every draw is made for the
    whole batch and then sliced, so W workers reproduce the single-worker step exactly."""
    accum = batch // (micro_batch * world)
    starts = [(m * world + rank) * micro_batch for m in range(accum)]
    return torch.cat([torch.arange(s, s + micro_batch) for s in starts])     # [accum * mb]


def prefetch(data: TrainData, order: DataOrder, start_nimg: int, end_nimg: int, batch: int, positions: torch.Tensor,
             device: torch.device, depth: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this worker's rows of each step from `start_nimg` on, gathered (and copied to the device)
    by a background thread so that the accelerator never waits for the host."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = device.type == "cuda"

    def produce() -> None:
        try:
            for nimg in range(start_nimg, end_nimg, batch):
                rows = order.rows_for(nimg, batch)[positions]
                item = {"x0": data.latents[rows], "labels": data.labels[rows]}
                if data.cluster is not None:
                    item["cluster"] = data.cluster[rows]
                if data.text_tokens is not None:
                    item["text"] = data.text_tokens[rows]
                item = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in item.items()}
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - surfaced in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="ddm-prefetch")
    thread.start()
    try:
        for _ in range(start_nimg, end_nimg, batch):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

"""Training data of one job, streamed from the run store with bounded memory.

A job's shards (an expert's partition, or for the router every data shard with its cluster labels)
are read through its scoped store. The data order is a pure function of (seed, epoch, nimg), so the
cursor of a resumed run is just `nimg` (edm2 style):

    epoch e = nimg // N visits the shards in the order randperm(S; seed, e), cut into consecutive
    windows of at least `window_rows` rows; inside window w the rows are visited in the order
    randperm(rows of w; seed, e, w).

Only the windows that the current step touches, plus the next one (read ahead by a background
thread), are resident: with a batch no larger than a window, at most three windows of at most
window_rows + one shard rows each, whatever the partition size. With window_rows >= N there is one
window per epoch: a full shuffle, as before streaming. Shards with an aspect-ratio bucket
(ShardRef.bucket) are streamed one bucket per batch by worker/bucket_data.py.
"""

from __future__ import annotations

import bisect
import json
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import UsageError
from common.manifests import ExpertManifest, ManifestError, RouterManifest, ShardRef
from common.storage import RunStore

DEFAULT_WINDOW_ROWS = 65_536
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (seed, purpose, nimg, ...), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [int(p) >> 32 for p in parts])
               .generate_state(1, np.uint64)[0] >> 1)


def read_tensors(store: RunStore, ref: ShardRef, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The named tensors of one verified safetensors payload (the others are never materialised)."""
    raw = store.get_payload(ref)                                   # size + sha256 checked
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    missing = [n for n in names if n not in header]
    if missing:
        raise ManifestError(f"{ref.path}: shard lacks tensors {missing}")
    out = {}
    view = memoryview(raw)
    for name in names + tuple(n for n in optional if n in header):
        meta = header[name]
        a, b = meta["data_offsets"]
        buf = view[8 + header_len + a: 8 + header_len + b]
        t = torch.frombuffer(bytearray(buf), dtype=_DTYPES[meta["dtype"]]) if b > a else \
            torch.empty(0, dtype=_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
        if out[name].shape[0] != ref.rows:
            raise ManifestError(f"{ref.path}: tensor {name} has {out[name].shape[0]} rows, manifest says {ref.rows}")
    return out


def load_shards(store: RunStore, refs: list[ShardRef], names: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Every listed shard, read whole (for small consumers: evaluation, distillation)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(refs)))) as pool:
        return list(pool.map(lambda r: read_tensors(store, r, names, ("text_tokens",)), refs))


class WindowOrder:
    """Position -> (epoch, window, row inside the window's concatenated shards); see the module doc."""

    def __init__(self, shard_rows: list[int], seed: int, window_rows: int) -> None:
        if not shard_rows or sum(shard_rows) == 0:
            raise ValueError("data order: no rows")
        self.shard_rows, self.seed, self.window_rows = list(shard_rows), seed, max(1, window_rows)
        self.rows = sum(shard_rows)
        self._epochs: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def windows(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """(shards of each window in visiting order, first position of each window + N at the end)."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch))
            groups: list[list[int]] = [[]]
            starts, filled = [0], 0
            for s in torch.randperm(len(self.shard_rows), generator=gen).tolist():
                if self.shard_rows[s] == 0:
                    continue
                if filled >= self.window_rows:
                    groups.append([])
                    starts.append(starts[-1] + filled)
                    filled = 0
                groups[-1].append(s)
                filled += self.shard_rows[s]
            self._epochs[epoch] = (groups, starts + [self.rows])
        return self._epochs[epoch]

    def _perm(self, epoch: int, w: int, n: int) -> torch.Tensor:
        key = (epoch, w)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[key] = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, 4, epoch, w)))
        return self._perms[key]

    def segments(self, nimg: int, n: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Images [nimg, nimg + n) as (epoch, window, slots in [0, n), rows inside the window)."""
        out = []
        pos = nimg
        while pos < nimg + n:
            epoch, p = divmod(pos, self.rows)
            groups, starts = self.windows(epoch)
            w = bisect.bisect_right(starts, p) - 1
            take = min(nimg + n - pos, starts[w + 1] - p)
            perm = self._perm(epoch, w, starts[w + 1] - starts[w])
            local = p - starts[w]
            out.append((epoch, w, torch.arange(pos - nimg, pos - nimg + take), perm[local:local + take]))
            pos += take
        return out

    def next_window(self, epoch: int, w: int) -> tuple[int, int]:
        return (epoch, w + 1) if w + 1 < len(self.windows(epoch)[0]) else (epoch + 1, 0)


STEP_NAMES = {"latents": "x0", "labels": "labels", "cluster": "cluster", "text_tokens": "text"}


def step_batch(gathered: dict[str, torch.Tensor], positions: torch.Tensor, device: torch.device
               ) -> dict[str, torch.Tensor]:
    """One step's gathered rows as the training loop takes them: this worker's positions, x0 as float,
    labels as long, on `device` (through pinned memory for CUDA)."""
    item = {STEP_NAMES[k]: v[positions] for k, v in gathered.items()}
    item["x0"], item["labels"] = item["x0"].float(), item["labels"].long()
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in item.items()}


_END = object()


def prefetch(items: Iterator[dict[str, torch.Tensor]], depth: int, name: str) -> Iterator[dict[str, torch.Tensor]]:
    """Runs `items` in a background thread up to `depth` steps ahead, so the accelerator never waits on
    reads. An error in it surfaces here; leaving early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the consumer (unless it has left)
            put(exc)

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class PartitionStream:
    """A job's shards and what the model needs to know about them; rows are read window by window."""
    store: RunStore
    manifest_key: str
    shards: list[ShardRef]
    assignments: list[ShardRef] | None       # router: cluster labels aligned with each shard
    latent_shape: list[int]
    num_classes: int | None
    text_dim: int | None
    num_experts: int
    rows: int
    window_rows: int = DEFAULT_WINDOW_ROWS
    stats: dict[str, int] = field(default_factory=lambda: {"resident_rows": 0, "peak_resident_rows": 0,
                                                            "shards_read": 0})

    def _header(self, ref: ShardRef) -> dict:
        """A shard's safetensors header (names, dtypes, shapes); the payload is read and verified whole."""
        raw = self.store.get_payload(ref)
        return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])

    def bucket_grids(self) -> dict[tuple[int, int], tuple[int, int]] | None:
        """Latent (height, width) of each bucket (width, height) the job's shards hold; None without buckets.
        Bucket sides are multiples of the pixels per latent cell, which one shard's header gives."""
        buckets = sorted({tuple(s.bucket) for s in self.shards if s.bucket is not None})
        if not buckets:
            return None
        ref = next(s for s in self.shards if s.bucket is not None)
        factor = ref.bucket[0] // self._header(ref)["latents"]["shape"][3]  # type: ignore[index]
        return {(w, h): (h // factor, w // factor) for w, h in buckets}

    def largest_latent_shape(self) -> list[int]:
        """The latent shape with the most cells among the job's buckets (the auto micro-batch probes it);
        latent_shape without buckets."""
        grids = self.bucket_grids()
        if grids is None:
            return list(self.latent_shape)
        return [self.latent_shape[0], *grids[max(grids, key=lambda b: (b[0] * b[1], b))]]

    def token_counter(self, batch: int, seed: int, patch: int) -> tuple[Callable[[int], int], Callable[[int], int]]:
        """(tokens seen at nimg, the nimg at which a token budget is reached) for this job's data order; an
        image's tokens are (h / p) x (w / p) of its bucket's latent grid."""
        grids = self.bucket_grids()
        if grids is None:
            per_image = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
            return (lambda nimg: nimg * per_image), (lambda tokens: -(-tokens // (batch * per_image)) * batch)
        from worker.bucket_data import BucketOrder

        order = BucketOrder([s.bucket for s in self.shards], [s.rows for s in self.shards], seed,  # type: ignore[misc]
                            self.window_rows, batch)
        costs = [(grids[b][0] // patch) * (grids[b][1] // patch) for b in order.buckets]
        return (lambda nimg: order.tokens_before(nimg, costs)), (lambda tokens: order.nimg_for_tokens(tokens, costs))

    def text_length(self) -> int:
        """Tokens per caption (text_tokens [N, L, D]), from the first shard's header."""
        header = self._header(self.shards[0])
        if "text_tokens" not in header:
            raise ManifestError(f"{self.shards[0].path}: text conditioning needs text_tokens, the shard has none")
        return int(header["text_tokens"]["shape"][1])

    def load_window(self, shard_ids: list[int]) -> dict[str, torch.Tensor]:
        """The window's shards concatenated; latents keep their stored dtype (bf16 halves the window)."""
        parts = []
        for s in shard_ids:
            t = read_tensors(self.store, self.shards[s], ("latents", "labels"), ("text_tokens",))
            got, bucket = list(t["latents"].shape[1:]), self.shards[s].bucket
            if bucket is None:
                want = list(self.latent_shape)
            else:  # its bucket's grid: the channels must agree, and a window holds one bucket (one grid)
                want = [self.latent_shape[0], *(list(parts[0]["latents"].shape[2:]) if parts else got[1:])]
            if got != want:
                raise ManifestError(f"{self.manifest_key}: {self.shards[s].path} holds latents {got}, "
                                    f"{'manifest says' if bucket is None else 'expected'} {want}")
            if self.assignments is not None:
                cluster = read_tensors(self.store, self.assignments[s], ("cluster",))["cluster"].long()
                if len(cluster) and (cluster.min() < 0 or cluster.max() >= self.num_experts):
                    raise ManifestError(f"{self.manifest_key}: {self.assignments[s].path}: cluster labels lie "
                                        f"outside [0, {self.num_experts})")
                t["cluster"] = cluster
            parts.append(t)
        self.stats["shards_read"] += len(shard_ids)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}

    def stream(self, start_nimg: int, end_nimg: int, batch: int, positions: torch.Tensor, device: torch.device,
               seed: int, depth: int = 2) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's rows of each step from `start_nimg` on. A background thread gathers each step
        (and copies it to the device) while the next window is read, so the accelerator never waits."""
        if any(s.bucket is not None for s in self.shards):  # aspect-ratio buckets: one bucket per batch
            from worker.bucket_data import stream_buckets
            yield from stream_buckets(self, start_nimg, end_nimg, batch, positions, device, seed, depth)
            return
        order = WindowOrder([r.rows for r in self.shards], seed, self.window_rows)
        listed = sum(r.rows for r in self.shards)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddm-window")
        resident: dict[tuple[int, int], Future] = {}

        def window(epoch: int, w: int) -> Future:
            if (epoch, w) not in resident:
                resident[(epoch, w)] = reader.submit(self.load_window, order.windows(epoch)[0][w])
            return resident[(epoch, w)]

        def steps() -> Iterator[dict[str, torch.Tensor]]:
            for nimg in range(start_nimg, end_nimg, batch):
                segs = order.segments(nimg, batch)
                for key in [k for k in resident if k < segs[0][:2]]:   # windows behind the cursor
                    del resident[key]
                ahead = order.next_window(*segs[-1][:2])
                if ahead[0] * order.rows + order.windows(ahead[0])[1][ahead[1]] < end_nimg:
                    window(*ahead)                                    # read ahead, unless past the end
                gathered: dict[str, torch.Tensor] = {}
                for epoch, w, slots, rows in segs:
                    data = window(epoch, w).result()
                    for k, v in data.items():
                        gathered.setdefault(k, torch.empty((batch, *v.shape[1:]), dtype=v.dtype))[slots] = v[rows]
                self._count(order, resident)
                if listed != self.rows:  # after the first read, so a shard outside the scope is named first
                    raise ManifestError(f"{self.manifest_key}: shards hold {listed} rows, manifest says {self.rows}")
                yield step_batch(gathered, positions, device)

        try:
            yield from prefetch(steps(), depth, "ddm-prefetch")
        finally:
            reader.shutdown(wait=True, cancel_futures=True)  # at most one window read still running

    def _count(self, order: WindowOrder, resident: dict[tuple[int, int], Future]) -> None:
        """Rows held by the resident windows (loaded or being read), for the memory bound's tests."""
        rows = 0
        for epoch, w in resident:
            starts = order.windows(epoch)[1]
            rows += starts[w + 1] - starts[w]
        self.stats["resident_rows"] = rows
        self.stats["peak_resident_rows"] = max(self.stats["peak_resident_rows"], rows)


def open_partition(store: RunStore, manifest_key: str, kind: str, window_rows: int = DEFAULT_WINDOW_ROWS) -> PartitionStream:
    """An expert's partition (ExpertManifest) or the router's view (RouterManifest + assignments); reads
    only the manifest, never a shard."""
    cls = RouterManifest if kind == "router" else ExpertManifest
    manifest = store.read_record(manifest_key, cls)
    if manifest is None:
        raise ManifestError(f"{manifest_key}: no committed manifest")
    if not manifest.shards or manifest.rows == 0:
        raise ManifestError(f"{manifest_key}: the partition is empty")
    assignments = None
    if kind == "router":
        assignments = list(manifest.assignments)
        if len(assignments) != len(manifest.shards) or any(a.rows != s.rows for a, s in zip(assignments, manifest.shards)):
            raise ManifestError(f"{manifest_key}: {len(assignments)} assignment files do not match the "
                                f"{len(manifest.shards)} shards")
    return PartitionStream(store, manifest_key, list(manifest.shards), assignments, list(manifest.latent_shape),
                           manifest.num_classes, manifest.text_dim, manifest.num_experts, manifest.rows, window_rows)


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


def load_partition(store: RunStore, manifest_key: str, kind: str) -> TrainData:
    """A whole partition in memory, for consumers that need every row at once and run on small data
    (evaluation's GMM judge, distillation). Training streams instead (`open_partition`)."""
    part = open_partition(store, manifest_key, kind)
    buckets = sorted({tuple(s.bucket) for s in part.shards if s.bucket is not None})
    if len(buckets) > 1:  # rows of several shapes cannot be one tensor
        raise UsageError(f"{manifest_key}: rows in {len(buckets)} aspect-ratio buckets (data.buckets); distillation "
                         f"takes one shape and is not built for bucketed runs (ddm eval judges them per shape)")
    window = part.load_window(list(range(len(part.shards))))
    return TrainData(latents=window["latents"].float(), labels=window["labels"].long(), cluster=window.get("cluster"),
                     text_tokens=window.get("text_tokens"), latent_shape=part.latent_shape,
                     num_classes=part.num_classes, text_dim=part.text_dim, num_experts=part.num_experts)


def worker_positions(batch: int, micro_batch: int, rank: int, world: int) -> torch.Tensor:
    """Positions inside a step's batch that this worker processes, micro-batch after micro-batch:
    micro-batch m of worker r holds [(m W + r) mb, (m W + r + 1) mb). Every draw is made for the
    whole batch and then sliced, so W workers reproduce the single-worker step exactly."""
    accum = batch // (micro_batch * world)
    starts = [(m * world + rank) * micro_batch for m in range(accum)]
    return torch.cat([torch.arange(s, s + micro_batch) for s in starts])     # [accum * mb]

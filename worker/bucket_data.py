"""Training data order with aspect-ratio buckets (data.buckets): every batch comes from one bucket.

A job's shards are grouped by bucket (ShardRef.bucket; buckets in the order of (width / height, width)).
Bucket j's N_j rows are streamed in their own `WindowOrder`, seeded by (seed, j), so inside a bucket rows
are windowed and shuffled exactly as in an unbucketed partition. With batch B:

    epoch e has S = sum_j ceil(N_j / B) steps. At each step the bucket is drawn with probability
    proportional to its rows not yet visited in the epoch (an integer draw from a generator seeded by
    (seed, e)), and the batch takes that bucket's next B rows of epoch e; a bucket's last batch is filled
    up from the start of its order of the same epoch (a few rows are seen twice in that epoch, none is
    skipped). Step g = nimg / B is step g mod S of epoch g div S.

So the order is a pure function of (seed, epoch, nimg): a run resumed at nimg reads exactly the batches the
uninterrupted run would have. Memory: the windows the current step touches, at most two per bucket seen
(a window stays resident until its bucket's next batch leaves it), read by the producer thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.buckets import Bucket
from common.manifests import ManifestError
from worker.data import WindowOrder, mix_seed, prefetch, step_batch

if TYPE_CHECKING:
    from worker.data import PartitionStream

Segment = tuple[int, int, torch.Tensor, torch.Tensor]  # (epoch, window, slots in the batch, rows in the window)


class BucketOrder:
    """nimg -> (bucket, the batch's segments in that bucket's windows); see the module doc."""

    def __init__(self, shard_buckets: list[Bucket], shard_rows: list[int], seed: int, window_rows: int,
                 batch: int) -> None:
        present = sorted({b for b, n in zip(shard_buckets, shard_rows) if n}, key=lambda b: (b[0] / b[1], b[0]))
        if not present:
            raise ValueError("data order: no rows")
        self.buckets, self.seed, self.batch = present, seed, batch
        self.shards = [[s for s, b in enumerate(shard_buckets) if b == bucket] for bucket in present]
        self.orders = [WindowOrder([shard_rows[s] for s in ids], mix_seed(seed, 6, j), window_rows)
                       for j, ids in enumerate(self.shards)]
        self.rows = [o.rows for o in self.orders]
        self.steps = sum(-(-n // batch) for n in self.rows)  # per epoch
        self._schedules: dict[int, list[tuple[int, int]]] = {}

    def schedule(self, epoch: int) -> list[tuple[int, int]]:
        """(bucket, its batch number in the epoch) of every step of `epoch`."""
        if epoch not in self._schedules:
            if len(self._schedules) > 1:
                self._schedules.pop(min(self._schedules))
            gen = np.random.Generator(np.random.PCG64(mix_seed(self.seed, 5, epoch)))
            remaining, taken, out = list(self.rows), [0] * len(self.rows), []
            for _ in range(self.steps):
                r = int(gen.integers(sum(remaining)))  # P(bucket j) = remaining_j / sum(remaining), exactly
                j = 0
                while r >= remaining[j]:
                    r -= remaining[j]
                    j += 1
                out.append((j, taken[j]))
                taken[j] += 1
                remaining[j] -= min(self.batch, remaining[j])
            self._schedules[epoch] = out
        return self._schedules[epoch]

    def step(self, nimg: int) -> tuple[int, list[Segment]]:
        """The bucket of the step starting at `nimg` and where its B rows lie in that bucket's windows."""
        g, rest = divmod(nimg, self.batch)
        if rest:
            raise ValueError(f"bucketed data order: nimg {nimg} is not a multiple of the batch {self.batch}")
        epoch, s = divmod(g, self.steps)
        j, k = self.schedule(epoch)[s]
        order, n = self.orders[j], self.rows[j]
        segments: list[Segment] = []
        filled, p = 0, k * self.batch
        while filled < self.batch:  # past the bucket's end: wrap to the start of its order in this epoch
            local = p % n
            take = min(self.batch - filled, n - local)
            segments += [(e, w, slots + filled, rows) for e, w, slots, rows in order.segments(epoch * n + local, take)]
            filled, p = filled + take, p + take
        return j, segments

    def step_tokens(self, bucket_tokens: list[int]) -> Iterator[int]:
        """Tokens of each step in order (batch x the tokens of its bucket's images), from step 0 on."""
        g = 0
        while True:
            epoch, s = divmod(g, self.steps)
            yield self.batch * bucket_tokens[self.schedule(epoch)[s][0]]
            g += 1

    def tokens_before(self, nimg: int, bucket_tokens: list[int]) -> int:
        """Tokens of the steps before `nimg` (a multiple of the batch): what a job has seen at nimg."""
        steps = self.step_tokens(bucket_tokens)
        return sum(next(steps) for _ in range(nimg // self.batch))

    def nimg_for_tokens(self, tokens: int, bucket_tokens: list[int]) -> int:
        """The first step boundary at which the steps so far hold at least `tokens` tokens."""
        seen, g = 0, 0
        for step in self.step_tokens(bucket_tokens):
            if seen >= tokens:
                break
            seen, g = seen + step, g + 1
        return g * self.batch

    def window_shards(self, j: int, epoch: int, w: int) -> list[int]:
        """The job's shard ids (positions in its manifest) of bucket j's window w in `epoch`."""
        return [self.shards[j][s] for s in self.orders[j].windows(epoch)[0][w]]

    def window_rows(self, j: int, epoch: int, w: int) -> int:
        starts = self.orders[j].windows(epoch)[1]
        return starts[w + 1] - starts[w]


def stream_buckets(part: PartitionStream, start_nimg: int, end_nimg: int, batch: int, positions: torch.Tensor,
                   device: torch.device, seed: int, depth: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """`PartitionStream.stream` for bucketed shards: this worker's rows of each step, every step's rows
    from one bucket (so x0 is [n, C, h, w] at that bucket's latent shape). Gathered by a producer thread."""
    buckets = [s.bucket for s in part.shards]
    if any(b is None for b in buckets):
        raise ManifestError(f"{part.manifest_key}: some shards have a bucket and some have none")
    order = BucketOrder(buckets, [s.rows for s in part.shards], seed, part.window_rows, batch)  # type: ignore[arg-type]
    listed = sum(r.rows for r in part.shards)
    resident: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def steps() -> Iterator[dict[str, torch.Tensor]]:
        for nimg in range(start_nimg, end_nimg, batch):
            j, segments = order.step(nimg)
            keys = {(j, e, w) for e, w, _, _ in segments}
            for key in [k for k in resident if k[0] == j and k not in keys]:  # this bucket's cursor has left it
                del resident[key]
            gathered: dict[str, torch.Tensor] = {}
            for e, w, slots, rows in segments:
                if (j, e, w) not in resident:
                    resident[(j, e, w)] = part.load_window(order.window_shards(j, e, w))
                for k, v in resident[(j, e, w)].items():
                    gathered.setdefault(k, torch.empty((batch, *v.shape[1:]), dtype=v.dtype))[slots] = v[rows]
            held = sum(order.window_rows(*key) for key in resident)
            part.stats["resident_rows"] = held
            part.stats["peak_resident_rows"] = max(part.stats["peak_resident_rows"], held)
            if listed != part.rows:
                raise ManifestError(f"{part.manifest_key}: shards hold {listed} rows, manifest says {part.rows}")
            yield step_batch(gathered, positions, device)

    yield from prefetch(steps(), depth, "ddm-bucket-prefetch")

"""Streaming training data: bounded resident rows, every row once per epoch, exact resume, router labels."""

from __future__ import annotations

import torch

from common.storage import RunStore
from tests.partitions import write_expert_partition, write_router_partition
from worker.data import WindowOrder, open_partition

torch.set_num_threads(1)


def _expert(tmp_path, rows: int, shard_rows: int = 50) -> RunStore:
    store = RunStore(str(tmp_path / f"run{rows}"))
    latents = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand(rows, 1, 2, 2).contiguous()
    write_expert_partition(store, 0, latents, torch.arange(rows) % 10, num_experts=4, num_classes=10,
                           shard_rows=shard_rows)
    return store


def _ids(batch: dict) -> list[int]:
    return batch["x0"][:, 0, 0, 0].long().tolist()


def test_every_row_once_per_epoch_and_windows_are_shuffled():
    order = WindowOrder([50] * 20, seed=7, window_rows=120)
    seen = []
    for epoch, w, _slots, rows in order.segments(0, 1000):
        shards = torch.tensor(order.windows(epoch)[0][w])
        seen += (shards[rows // 50] * 50 + rows % 50).tolist()                # window row -> dataset row
    assert sorted(seen) == list(range(1000))                                 # a permutation of the epoch
    assert all(len(g) == 3 for g in order.windows(0)[0][:-1])                # windows of >= 120 rows
    assert order.windows(0)[0] != order.windows(1)[0]                        # shards reshuffled each epoch
    assert seen[:150] != sorted(seen[:150])                                  # rows shuffled inside a window


def test_memory_is_bounded_by_the_window_not_the_partition(tmp_path):
    """Ten times the rows, the same resident rows: at most three windows of 100 rows (+ one shard each)."""
    peaks = {}
    for rows in (400, 4000):
        part = open_partition(_expert(tmp_path, rows), "experts/00/manifest.json", "expert", window_rows=100)
        n = 0
        for batch in part.stream(0, 2 * rows, 32, torch.arange(32), torch.device("cpu"), seed=3):
            n += len(_ids(batch))
        assert n >= 2 * rows and part.stats["shards_read"] >= 2 * rows // 50  # two epochs were streamed
        peaks[rows] = part.stats["peak_resident_rows"]
    assert peaks[400] == peaks[4000] and peaks[4000] <= 3 * (100 + 50)


def test_resume_from_any_nimg_reproduces_the_uninterrupted_stream(tmp_path):
    store = _expert(tmp_path, 730, shard_rows=64)  # ragged last shard, epochs not a multiple of the batch
    part = open_partition(store, "experts/00/manifest.json", "expert", window_rows=100)
    full = [_ids(b) for b in part.stream(0, 2000, 40, torch.arange(40), torch.device("cpu"), seed=5)]
    for start in (40, 720, 1480):
        again = open_partition(store, "experts/00/manifest.json", "expert", window_rows=100)
        resumed = [_ids(b) for b in again.stream(start, 2000, 40, torch.arange(40), torch.device("cpu"), seed=5)]
        assert resumed == full[start // 40:]
    # the two workers of a step take their positions of the same draw
    halves = [[_ids(b) for b in part.stream(0, 400, 40, torch.arange(r * 20, r * 20 + 20), torch.device("cpu"), seed=5)]
              for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full[:10]


def test_router_streams_every_partition_with_its_cluster_labels(tmp_path):
    store = RunStore(str(tmp_path / "router"))
    rows = 600
    latents = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand(rows, 1, 2, 2).contiguous()
    cluster = torch.arange(rows) % 4
    write_router_partition(store, latents, torch.zeros(rows, dtype=torch.long),
                           cluster, num_experts=4, shard_rows=64)
    part = open_partition(store, "router/manifest.json", "router", window_rows=128)
    for batch in part.stream(0, rows, 60, torch.arange(60), torch.device("cpu"), seed=1):
        assert torch.equal(batch["cluster"], torch.tensor(_ids(batch)) % 4)
    assert part.stats["peak_resident_rows"] <= 3 * (128 + 64)


def test_prefetch_yields_in_order_surfaces_the_producers_error_and_stops_when_left() -> None:
    import threading

    import pytest

    from worker.data import prefetch

    assert [d["i"] for d in prefetch(({"i": i} for i in range(5)), 2, "t")] == [0, 1, 2, 3, 4]

    def failing():
        yield {"i": 0}
        raise ValueError("shard 3 is damaged")

    got = []
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        for d in prefetch(failing(), 2, "t"):
            got.append(d["i"])
    assert got == [0]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield {"i": i}
            i += 1

    stream = prefetch(endless(), 2, "ddm-test-prefetch")
    assert next(stream)["i"] == 0
    stream.close()  # the consumer left: the thread stops, bounded by the queue depth
    assert not any(t.name == "ddm-test-prefetch" for t in threading.enumerate()) and len(produced) <= 5

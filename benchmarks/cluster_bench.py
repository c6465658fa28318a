"""Clustering benchmark: our torch k-means vs faiss (and optionally scikit-learn), side by side.

Fits `--fine` centroids on a `--fit` x `--dim` sample (`--iters` Lloyd iterations, same for all) and
assigns `--assign` vectors; then measures the peak memory of streaming assignment over `--stream`
vectors in chunks (a child process, so its peak RSS is its own).

    python benchmarks/cluster_bench.py                 # the BENCHMARKS.md figures
    python benchmarks/cluster_bench.py --sklearn       # also MiniBatchKMeans (slow)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker.clustering import BalancedAssigner, kmeans, nearest, prepare  # noqa: E402


def blobs(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    """Clustered data (like pooled image features), not uniform noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim)).astype(np.float32)
    return (means[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def stream_peak(rows: int, dim: int, fine: int, chunk: int) -> None:
    """Child: assign `rows` vectors generated chunk by chunk (as shards would be read), print peak RSS."""
    torch.manual_seed(0)
    centroids = prepare(torch.randn(fine, dim), "euclidean")
    assign = BalancedAssigner(centroids, "euclidean")
    counts = torch.zeros(fine, dtype=torch.long)
    t0 = time.perf_counter()
    for a in range(0, rows, chunk):
        x = torch.randn(min(chunk, rows - a), dim)
        counts += torch.bincount(assign(x), minlength=fine)
    dt = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20
    print(f"{peak:.3f} {dt:.2f} {int(counts.sum())}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fit", type=int, default=50_000)
    p.add_argument("--assign", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--fine", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--stream", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=65_536)
    p.add_argument("--sklearn", action="store_true", help="also time scikit-learn MiniBatchKMeans (slow)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return stream_peak(args.stream, args.dim, args.fine, args.chunk)

    import faiss

    data = blobs(args.fit + args.assign, args.dim, 4 * args.fine, seed=0)
    sample, queries = data[:args.fit], data[args.fit:]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), torch {torch.__version__}")
    print(f"fit {args.fine} centroids on {args.fit} x {args.dim}, {args.iters} iterations; assign {args.assign}")
    rows = []

    km = faiss.Kmeans(args.dim, args.fine, niter=args.iters, seed=1, max_points_per_centroid=10**9)
    _, t_fit = timed(lambda: km.train(sample))
    _, t_as = timed(lambda: km.index.search(queries, 1))
    rows.append(("faiss", t_fit, args.assign / t_as, km.obj[-1] / args.fit))

    xs, xq = torch.from_numpy(sample), torch.from_numpy(queries)
    res, t_fit = timed(lambda: kmeans(xs, args.fine, args.iters, "euclidean", seed=1))
    _, t_as = timed(lambda: nearest(xq, res.centroids, "euclidean"))
    rows.append(("ours (torch)", t_fit, args.assign / t_as, res.inertia / args.fit))

    if args.sklearn:
        from sklearn.cluster import MiniBatchKMeans

        mb = MiniBatchKMeans(args.fine, max_iter=args.iters, n_init=1, random_state=1, batch_size=4096)
        _, t_fit = timed(lambda: mb.fit(sample))
        _, t_as = timed(lambda: mb.predict(queries))
        rows.append(("sklearn MiniBatchKMeans", t_fit, args.assign / t_as, -mb.score(sample) / args.fit))

    print(f"| {'implementation':<24} | fit (s) | assign (vectors/s) | mean sq. distance (fit sample) |")
    print(f"|{'-' * 26}|---------|--------------------|--------------------------------|")
    for name, fit, rate, obj in rows:
        print(f"| {name:<24} | {fit:7.2f} | {rate:18,.0f} | {obj:30.2f} |")
    ours, faiss_row = rows[1], rows[0]
    print(f"fit ratio ours/faiss = {ours[1] / faiss_row[1]:.2f} (target <= 1.5); "
          f"assign ratio ours/faiss = {ours[2] / faiss_row[2]:.2f} (target >= 1)")

    out = subprocess.run([sys.executable, __file__, "--_child", "--stream", str(args.stream), "--dim", str(args.dim),
                          "--fine", str(args.fine), "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
    peak, secs, n = out.stdout.split()
    print(f"streaming assignment of {int(n):,} x {args.dim} vectors to {args.fine} centroids in chunks of "
          f"{args.chunk:,}: peak RSS {float(peak):.2f} GiB (target < 2), {float(secs):.1f} s")


if __name__ == "__main__":
    main()

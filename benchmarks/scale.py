"""How the data plane grows with the dataset: prepare, clustering, the training loader, and peak memory.

    PYTHONPATH=$PWD python benchmarks/scale.py --cases img2k,img20k,lat100k,lat1m [--work /tmp/ddm-scale]
    PYTHONPATH=$PWD python benchmarks/scale.py --cases img1m   # 1M files (~4 GB on disk), ~20 min here

Cases
  imgN     N small JPEGs (48x48, 10 class folders). `ddm run --until cluster` in a subprocess (prepare on
           Ray Data on the local Ray, then cluster) with the driver's RSS polled every 50 ms; prepare img/s
           against a plain single-process PIL loop (open, RGB, resize) over the same files, in one run;
           cluster fit / assignment seconds from the stage record. Encoders are pixel features and
           identity latents, so prepare's figure is read + decode + write (encoder cost excluded).
  s3imgN   the same, with the source and the run store on a moto S3 server on 127.0.0.1 (over HTTP).
  latN     N rows of 4x8x8 bf16 latents + 16-d features, written as prepared shards; then the cluster
           stage in-process (K = 4), the streaming loader over expert 0 for one epoch (window WINDOW rows)
           against reading the same shards into memory first, and a real training worker
           (`python -m worker.train`, a small DiT, a little over two windows of steps) whose peak RSS
           is reported, with the loader's peak resident rows.
Prints one JSON line per case and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WINDOW = 16_384  # training.data_window_rows for the latents cases: below both experts' sizes, so both stream
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")


def make_images(root: Path, n: int) -> None:
    from PIL import Image

    if root.exists() and len(list(root.rglob("*.jpg"))) == n:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 48, dtype=np.float32)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.stack([np.add.outer(base, base) / 2 * rng.uniform(0.3, 1), np.tile(base, (48, 1)) * rng.uniform(0.3, 1),
                        rng.uniform(0, 255, (48, 48))], -1)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:07d}.jpg", quality=85)


def pil_loop(root: Path, size: int) -> float:
    """img/s of the plain baseline: one process, open + RGB + resize, nothing else. Every file is read once
    untimed first, so the loop, like the prepare that follows it, reads from a warm page cache."""
    from PIL import Image

    files = sorted(root.rglob("*.jpg"))
    for f in files:
        f.read_bytes()
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    return len(files) / (time.perf_counter() - t0)


def run_polled(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB of the process itself, output) with RSS sampled every 50 ms."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return time.perf_counter() - t0, peak / 2**20, out


def image_case(n: int, work: Path, s3: bool, extra: list[str]) -> dict:
    from common.storage import RunStore, read_json

    src = work / f"img{n}"
    make_images(src, n)
    source, run, env = str(src), str(work / f"run-img{n}"), dict(ENV)
    if s3:
        import s3fs
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{server._server.server_port}"
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")})
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url})
        fs.mkdir("bench")
        fs.put(str(src), "bench/src", recursive=True)
        source, run = "s3://bench/src", "s3://bench/run"
    else:
        shutil.rmtree(run, ignore_errors=True)
    baseline = pil_loop(src, 16)
    cmd = [sys.executable, "-m", "orchestrator", "run", "--run", run, "--preset", "digits", "--until", "cluster", "--quiet",
           "--set", f"data.source={source}", "--set", "data.image_size=16", "--set", "data.channels=3",
           "--set", "data.label_source=folder", "--set", "data.shard_rows=1024", "--set", "features.pixels_size=4",
           *[arg for item in extra for arg in ("--set", item)]]
    wall, rss, _ = run_polled(cmd, env)
    store = RunStore(run)
    prep, clus = read_json(store, "stages/prepare.json"), read_json(store, "stages/cluster.json")
    img_s = n / prep["duration_s"]
    listing_s = prep["details"]["source_listing"]["seconds"]  # the content listing (hashes), before the stage
    return {"case": f"{'s3' if s3 else ''}img{n}", "rows": n, "wall_s": round(wall, 1), "driver_peak_rss_mib": round(rss),
            "prepare_s": prep["duration_s"], "prepare_img_s": round(img_s), "pil_loop_img_s": round(baseline),
            "prepare_vs_pil": round(img_s / baseline, 2), "source_listing_s": listing_s,
            "listing_and_prepare_vs_pil": round(n / (listing_s + prep["duration_s"]) / baseline, 2),
            "prepare_first_shard_s": prep["details"]["first_shard_s"],
            "prepare_steady_img_s": prep["details"]["steady_img_per_s"],
            "steady_vs_pil": round((prep["details"]["steady_img_per_s"] or 0) / baseline, 2),
            "cluster_fit_s": clus["details"]["fit_s"],
            "cluster_assign_s": clus["details"]["assign_s"]}


def write_latents(store, n: int, shard_rows: int = 4096) -> None:
    """A prepared dataset of n rows (4 separated blobs in feature space), as prepare commits it."""
    import torch
    from safetensors.torch import save

    from common.manifests import DatasetManifest, ShardRef

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)).astype(np.float32) * 4
    shards = []
    for i, a in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - a)
        comp = rng.integers(0, 4, m)
        feats = centres[comp] + rng.standard_normal((m, 16), dtype=np.float32)
        tensors = {"latents": torch.from_numpy(rng.standard_normal((m, 4, 8, 8), dtype=np.float32)).to(torch.bfloat16),
                   "features": torch.from_numpy(feats), "labels": torch.from_numpy(comp.astype(np.int64)),
                   "index": torch.arange(a, a + m)}
        ref = store.put_payload(f"data/shards/{i:05d}.safetensors", save(tensors))
        shards.append(ShardRef(**ref.model_dump(), rows=m))
    store.commit("data/dataset.json", DatasetManifest(source="synthetic", discovered=n, used=n, quarantined=0,
                                                      latent_shape=[4, 8, 8], feature_dim=16, num_classes=4,
                                                      latent_dtype="bf16", shards=shards))


CHILD_STREAM = """
import json, resource, sys, time, torch
from common.storage import RunStore
from worker.data import load_partition, open_partition
torch.set_num_threads(1)
run, mode, batch = sys.argv[1], sys.argv[2], 256
store = RunStore(run)
t0 = time.perf_counter()
part = open_partition(store, "experts/00/manifest.json", "expert", window_rows=int(sys.argv[3]))
n = part.rows - part.rows % batch
if mode == "stream":
    for b in part.stream(0, n, batch, torch.arange(batch), torch.device("cpu"), seed=0):
        pass
    extra = {"peak_resident_rows": part.stats["peak_resident_rows"]}
else:  # read every shard into memory, then gather the same number of random batches
    data = load_partition(store, "experts/00/manifest.json", "expert")
    perm = torch.randperm(data.rows)
    for a in range(0, n, batch):
        x = data.latents[perm[a:a + batch]].float()
    extra = {}
print(json.dumps({"img_s": n / (time.perf_counter() - t0), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def latents_case(n: int, work: Path) -> dict:
    from common.config import ModelConfig, TrainingConfig, resolve_config
    from common.manifests import DatasetManifest
    from common.storage import RunStore
    from worker.partition import cluster_data
    from worker.train import TrainJob

    run = work / f"run-lat{n}"
    store = RunStore(str(run))
    write_s = None  # a dataset written by an earlier run of this script is reused
    ds = store.read_record("data/dataset.json", DatasetManifest) if (run / "data" / "dataset.json").exists() else None
    if ds is None or ds.used != n:
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        write_latents(store, n)
        write_s = round(time.perf_counter() - t0, 1)
    cfg = resolve_config("digits", overrides=["clustering.num_experts=4", "clustering.metric=euclidean"])
    result = cluster_data(cfg, store)
    expert_rows = result.counts["size_0"]
    child = [sys.executable, "-c", CHILD_STREAM, str(run)]
    streamed = json.loads(subprocess.run(child + ["stream", str(WINDOW)], env=ENV, cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout.splitlines()[-1])
    in_memory = json.loads(subprocess.run(child + ["memory", str(WINDOW)], env=ENV, cwd=ROOT, capture_output=True,
                                          text=True, check=True).stdout.splitlines()[-1])
    # a small DiT for a little over two windows of steps: the loader's peak (three windows) is reached
    job = TrainJob(name="expert-00", kind="expert", prefix="experts/00", manifest_key="experts/00/manifest.json",
                   model=ModelConfig(size="tiny", width=32, depth=2, heads=2, patch_size=2, conditioning="class"),
                   training=TrainingConfig(duration_nimg=256 * (2 * WINDOW // 256 + 4), lr=1e-3, log_every_nimg=10**9,
                                           checkpoint_every_nimg=10**9, data_window_rows=WINDOW),
                   batch=256, micro_batch=256, seed=1, num_experts=4)
    (work / "job.json").write_text(job.model_dump_json())
    store.delete("experts/00/checkpoints")  # a fresh training worker each time
    store.delete("experts/00/export.json")
    train_s, usage, _ = run_polled([sys.executable, "-m", "worker.train", "--job", str(work / "job.json"), "--store", str(run)], ENV)
    return {"case": f"lat{n}", "rows": n, "write_s": write_s, "cluster_fit_s": result.details["fit_s"],
            "cluster_assign_s": result.details["assign_s"], "expert0_rows": expert_rows,
            "loader_img_s": round(streamed["img_s"]), "in_memory_img_s": round(in_memory["img_s"]),
            "loader_rss_mib": round(streamed["rss_mib"]), "in_memory_rss_mib": round(in_memory["rss_mib"]),
            "peak_resident_rows": streamed["peak_resident_rows"], "train_worker_peak_rss_mib": round(usage),
            "train_s": round(train_s, 1), "train_nimg": job.training.duration_nimg, "window_rows": WINDOW}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="img2k,img20k,lat100k,lat1m")
    parser.add_argument("--work", default="/tmp/ddm-scale")
    parser.add_argument("--set", action="append", default=[], help="config override for the image cases")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"2k": 2_000, "20k": 20_000, "100k": 100_000, "1m": 1_000_000}
    rows = []
    for case in args.cases.split(","):
        size = sizes[re.sub(r"^(s3)?(img|lat)", "", case)]
        t0 = time.perf_counter()
        if case.startswith("lat"):
            row = latents_case(size, work)
        else:
            row = image_case(size, work, case.startswith("s3"), args.set)
        row["load_avg_1m"] = round(os.getloadavg()[0], 1)
        row["case_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()

"""First contact of `worker.train.train` with a GPU, end to end on a small synthetic partition (no Ray, a
local run store): a `use_gpu` job with bf16, `compile: auto`, TF32 and `per_worker_batch: auto` (the
micro-batch probe), then a resume from its checkpoint into fused AdamW; first of all, two runs with
`training.deterministic` that must produce identical exports. Prints one JSON line per check.

    python benchmarks/cuda_smoke.py [--size B] [--latent 4 32 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch

from common.config import ModelConfig, TrainingConfig
from common.storage import RunStore
from tests.partitions import write_expert_partition
from worker.train import TrainJob, job_store, train


def _job(size: str, batch: int, nimg: int, use_gpu: bool, **training) -> TrainJob:
    tc = TrainingConfig(duration_nimg=nimg, lr=1e-4, checkpoint_every_nimg=nimg // 2, log_every_nimg=batch * 4,
                        precision="bf16", **training)
    return TrainJob(name="expert-00", kind="expert", prefix="experts/00", manifest_key="experts/00/manifest.json",
                    model=ModelConfig(size=size, patch_size=2, conditioning="class"), training=tc, batch=batch,
                    micro_batch=batch, use_gpu=use_gpu, island="cuda-smoke", num_experts=1)


def _store(root: str, latent: list[int], rows: int = 512) -> RunStore:
    store = RunStore(root)
    g = torch.Generator().manual_seed(0)
    write_expert_partition(store, 0, torch.randn(rows, *latent, generator=g), torch.randint(0, 1000, (rows,), generator=g),
                           num_experts=1, num_classes=1000, shard_rows=256)
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="B")
    p.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of this script")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")  # shows the micro-batch probe
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("cuda_smoke: no CUDA device is visible here")
    with tempfile.TemporaryDirectory() as tmp:
        # First, before any other CUDA work: cuBLAS reads its workspace setting when its handle is created.
        digests = []
        for i in range(2):
            store = _store(f"{tmp}/det{i}", args.latent)
            det = _job(args.size, 64, 64 * 6, gpu, deterministic=True)
            digests.append(train(det, job_store(store, det)).weights.sha256)
        print(json.dumps({"bench": "cuda_smoke", "check": "training.deterministic: two runs bit-identical",
                          "ok": digests[0] == digests[1]}), flush=True)
        store = _store(f"{tmp}/run", args.latent)
        job = _job(args.size, args.batch, args.batch * 20, gpu, compile="auto").model_copy(update={"auto_micro_batch": True})
        start = time.perf_counter()
        first = train(job, job_store(store, job))
        rows = [json.loads(line) for line in store.read_bytes("experts/00/metrics.jsonl").decode().splitlines()]
        print(json.dumps({"bench": "cuda_smoke", "check": "train bf16 + compile auto + auto micro-batch",
                          "nimg": first.nimg, "wall_s": round(time.perf_counter() - start, 1),
                          "img_per_s_last": round(rows[-1]["img_per_s"], 1), "loss_last": round(rows[-1]["loss"], 4),
                          "mfu_last": round(rows[-1]["mfu"], 4)}), flush=True)
        longer = job.model_copy(update={"training": job.training.model_copy(update={"duration_nimg": args.batch * 30})})
        resumed = train(longer, job_store(store, longer))  # from the committed checkpoint: fused AdamW + saved state
        print(json.dumps({"bench": "cuda_smoke", "check": "resume into fused AdamW", "nimg": resumed.nimg,
                          "ok": resumed.nimg == args.batch * 30}), flush=True)


if __name__ == "__main__":
    main()

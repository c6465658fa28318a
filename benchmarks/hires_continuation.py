"""The high-resolution stage against training from scratch at the same resolution, on the digits demo.

    python benchmarks/hires_continuation.py --out-dir /tmp/hires-bench

Runs (or reuses, when committed) `ddm run` with `hires.image_size` (digits at 8x8, then 16x16, K = 2), then trains every hires job
again from random weights on a copy of its partition: the same job spec, data order and noise, only the
starting weights differ. Prints, per job, the mean loss over the first log interval and over the last,
continued vs from scratch, and their ratio. Loss is the flow-matching loss on the job's own training
rows (the router's: cross-entropy on cluster labels), the quantity both runs minimise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import resolve_config  # noqa: E402
from common.storage import RunStore  # noqa: E402


def losses(store: RunStore, prefix: str) -> list[float]:
    return [json.loads(line)["loss"] for line in store.read_bytes(f"{prefix}/metrics.jsonl").splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/hires-bench"))
    parser.add_argument("--base-nimg", type=int, default=64_000, help="experts' total at 8x8")
    parser.add_argument("--hires-nimg", type=int, default=16_000, help="experts' total at 16x16")
    args = parser.parse_args()
    import torch

    from orchestrator.pipeline import run_pipeline
    from orchestrator.train_stage import build_jobs
    from worker.train import train

    torch.set_num_threads(2)
    run = args.out_dir / "run"  # a committed run is reused (its stages are skipped); the scratch runs are redone
    config = resolve_config("digits", overrides=[
        f"run_uri={run}", "clustering.num_experts=2", "training.global_batch=128",
        f"training.total_nimg={args.base_nimg}", "training.log_every_nimg=1024", "router.training.total_nimg=8192",
        "hires.image_size=16", f"hires.total_nimg={args.hires_nimg}", "hires.router_nimg=4096",
        "sampling.num_samples=16"])
    t0 = time.perf_counter()
    run_pipeline(config, show_progress=False)
    print(f"ddm run (base 8x8 + hires 16x16): {time.perf_counter() - t0:.0f} s")
    hires = RunStore(str(run / "hires"))
    jobs = build_jobs(config.hires_run_config(), "hires")
    rows = []
    for name, prefix in (("expert-00", "experts/00"), ("expert-01", "experts/01"), ("router", "router")):
        scratch = args.out_dir / f"scratch-{name}"
        shutil.rmtree(scratch, ignore_errors=True)
        if name != "router":
            shutil.copytree(run / "hires" / prefix / "data", scratch / prefix / "data")
        (scratch / prefix).mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "hires" / prefix / "manifest.json", scratch / prefix / "manifest.json")
        if name == "router":  # its labels and every expert's rows
            shutil.copytree(run / "hires" / "clusters" / "router", scratch / "clusters" / "router", dirs_exist_ok=True)
            for k in ("00", "01"):
                shutil.copytree(run / "hires" / "experts" / k / "data", scratch / "experts" / k / "data", dirs_exist_ok=True)
        job = next(iter(jobs[name].values())).model_copy(update={"init_key": None})
        train(job, RunStore(str(scratch)))
        cont, scr = losses(hires, prefix), losses(RunStore(str(scratch)), prefix)
        rows.append((name, cont[0], scr[0], cont[-1], scr[-1]))
    print(f"\n{'job':<10} {'first interval: continued':>26} {'scratch':>8} {'ratio':>6}   "
          f"{'last interval: continued':>25} {'scratch':>8} {'ratio':>6}")
    for name, c0, s0, c1, s1 in rows:
        print(f"{name:<10} {c0:>26.4f} {s0:>8.4f} {c0 / s0:>6.2f}   {c1:>25.4f} {s1:>8.4f} {c1 / s1:>6.2f}")


if __name__ == "__main__":
    main()

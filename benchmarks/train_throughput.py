"""Throughput of the expert training step the presets train, with MFU against a dense matmul (bf16 on GPU,
fp32 on CPU) measured in the same process.

The step is `worker.step.train_step` with `worker.train`'s own draws and objective, the optimizer of
`worker.step.make_optimizer` (fused AdamW on CUDA), grad clipping, EMA, `training.tf32` and
`training.compile` as the imagenet-xl2 preset sets them, on synthetic latents (no data loading, one worker,
no accumulation). Imports neither Ray nor any object-store client.

    python benchmarks/train_throughput.py                       # CPU: tiny DiT, batch 64, 8x8x1
    python benchmarks/train_throughput.py --suite h200          # GPU: XL/2 b128 and B/2 b256 at 4x32x32, 1000 classes:
                                                                #   fp32+TF32 eager, bf16 eager, bf16 + compile
    python benchmarks/train_throughput.py --suite h200 --only 4 # some configurations of the suite (e.g. 0,1,2,3)
    python benchmarks/train_throughput.py --size B --batch 256 --latent 4 32 32 --precision bf16 --compile

Targets on one H200 (docs/design.md §10): >= 620 img/s for XL/2 at batch 128, >= 3,000 for B/2 at 256 (the reference
facebookresearch/DiT reaches 559 and 2,674 there).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from common.config import ModelConfig
from common.presets import PRESETS
from worker.devices import configure_numerics
from worker.metrics import matmul_tflops
from worker.models.dit import build_dit
from worker.step import StepParts, make_optimizer, train_step, wrap_for_training
from worker.train import TrainJob, objective, step_draws

# (model size, batch, precision, compile): eager configurations first, so a slow compile cannot hide them.
SUITE_H200 = [("XL", 128, "fp32", False), ("XL", 128, "bf16", False), ("B", 256, "fp32", False),
              ("B", 256, "bf16", False), ("XL", 128, "bf16", True), ("B", 256, "bf16", True)]


def bench(size: str, patch: int, batch: int, latent: list[int], precision: str, compile_: bool, steps: int,
          warmup: int, device: torch.device, num_classes: int = 1000, preset: str = "imagenet-xl2") -> dict:
    """Steps of the preset's expert training on `device`; compile_ False forces eager, True compiles."""
    base = PRESETS[preset]()
    tc = base.training.model_copy(update={"precision": precision, "compile": compile_})
    model_cfg = ModelConfig(size=size, patch_size=patch, conditioning="class", label_dropout=base.model.label_dropout)
    job = TrainJob(name=f"bench-{size}", kind="expert", prefix="bench", manifest_key="bench/manifest.json",
                   model=model_cfg, training=tc, batch=batch, micro_batch=batch)
    configure_numerics(tc.tf32, tc.deterministic)
    torch.manual_seed(0)
    model = build_dit(model_cfg, latent, num_classes, None).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    parts = StepParts(model, ema, make_optimizer(model, tc, device), *wrap_for_training(model, device, tc, 1),
                      device, tc, 1)
    data = {"x0": torch.randn(batch, *latent, device=device),
            "labels": torch.randint(0, num_classes, (batch,), device=device)}
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        t, eps, drop = step_draws(job, latent, gen, device)
        micro = lambda fwd, m: objective(job, fwd, model.config.num_classes, data, t, eps, drop)  # noqa: E731
        train_step(parts, micro, 1, batch, tc.lr, i)

    start = time.perf_counter()
    step(0)  # the first step compiles (when compiling) and allocates
    sync()
    first_s = time.perf_counter() - start
    for i in range(1, warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    elapsed = time.perf_counter() - start
    peak = matmul_tflops(device, seconds=1.0 if device.type == "cuda" else 0.5)
    img_s = steps * batch / elapsed
    train_flops = 3 * model.flops_per_image()
    cuda = device.type == "cuda"
    return {"bench": "train_throughput", "model": f"DiT-{size}/{patch}", "batch": batch, "latent": latent,
            "classes": num_classes, "precision": precision if cuda else "fp32", "tf32": tc.tf32 and cuda,
            "compile": compile_, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps,
            "first_step_s": first_s, "steps_per_s": steps / elapsed, "img_per_s": img_s,
            "train_gflops_per_img": train_flops / 1e9, "achieved_tflops": img_s * train_flops / 1e12,
            "bf16_matmul_tflops" if cuda else "fp32_matmul_tflops": peak, "mfu": img_s * train_flops / (peak * 1e12),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["h200"], help="the GPU target configurations (6 runs)")
    p.add_argument("--only", help="with --suite: comma-separated configurations to run (0-5)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, nargs=3, default=[1, 8, 8])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on CPU, 30 in the suite)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on CPU, 8 in the suite)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.suite == "h200":
        if device.type != "cuda":
            raise SystemExit("--suite h200: no CUDA device is visible here")
        chosen = SUITE_H200 if args.only is None else [SUITE_H200[int(i)] for i in args.only.split(",")]
        runs = [dict(size=s, patch=2, batch=b, latent=[4, 32, 32], precision=prec, compile_=c, steps=args.steps or 30,
                     warmup=args.warmup or 8, num_classes=1000) for s, b, prec, c in chosen]
    else:
        runs = [dict(size=args.size, patch=args.patch, batch=args.batch, latent=args.latent, precision=args.precision,
                     compile_=args.compile, steps=args.steps or 200, warmup=args.warmup or 20, num_classes=args.classes)]
    for run in runs:
        result = bench(device=device, **run)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()

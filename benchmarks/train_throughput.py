"""Throughput of our expert training step (forward, backward, grad clip, AdamW, EMA), with MFU against a
bf16 (GPU) / fp32 (CPU) matmul measured in the same process.

    python benchmarks/train_throughput.py                       # CPU: tiny preset, batch 64, 8x8x1 (steps/s)
    python benchmarks/train_throughput.py --suite h200          # GPU: DiT-XL/2 b128 and DiT-B/2 b256, 4x32x32
    python benchmarks/train_throughput.py --size B --batch 256 --latent 4 32 32 --precision bf16 --compile

Targets on one H200 (docs/design.md §10): >= 620 img/s for XL/2 at batch 128, >= 3,000 for B/2 at 256.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common.config import ModelConfig, TrainingConfig
from worker.flow import flow_matching_loss, sample_t
from worker.metrics import matmul_tflops
from worker.models.dit import build_dit
from worker.train import _update_ema


def bench(size: str, patch: int, batch: int, latent: list[int], precision: str, compile_: bool, steps: int,
          warmup: int, device: torch.device, num_classes: int = 1000) -> dict:
    """The step of worker.train.train for one worker without accumulation, on synthetic latents."""
    torch.manual_seed(0)
    tc = TrainingConfig(precision=precision, compile=compile_)
    model = build_dit(ModelConfig(size=size, patch_size=patch, conditioning="class"), latent, num_classes, None)
    model = model.to(device).train()
    ema = build_dit(ModelConfig(size=size, patch_size=patch, conditioning="class"), latent, num_classes, None)
    ema = ema.to(device).eval().requires_grad_(False)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fast)
    fwd = torch.compile(model) if compile_ else model
    bf16 = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")
    x0 = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        t = sample_t(batch, tc.timestep_sampling, gen, device)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        with bf16:
            loss = flow_matching_loss(fwd, x0, eps, t, y)
        (loss.sum() / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _update_ema(ema, model, i, tc)

    for i in range(warmup):
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
    return {"model": f"DiT-{size}/{patch}", "batch": batch, "latent": latent, "precision": precision if device.type == "cuda" else "fp32",
            "compile": compile_, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "steps_per_s": steps / elapsed, "img_per_s": img_s,
            "train_gflops_per_img": train_flops / 1e9, "achieved_tflops": img_s * train_flops / 1e12,
            "matmul_tflops": peak, "mfu": img_s * train_flops / (peak * 1e12)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["h200"], help="the GPU target configurations of issue 4")
    p.add_argument("--size", default="tiny")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, nargs=3, default=[1, 8, 8])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs as TF32, like the reference "as shipped"
    torch.backends.cudnn.allow_tf32 = True
    if args.suite == "h200":
        if device.type != "cuda":
            raise SystemExit("--suite h200: no CUDA device here")
        runs = [dict(size=s, patch=2, batch=b, latent=[4, 32, 32], precision=prec, compile_=c, steps=50, warmup=15,
                     num_classes=1000) for s, b in (("XL", 128), ("B", 256)) for prec, c in (("fp32", False), ("bf16", True))]
    else:
        runs = [dict(size=args.size, patch=args.patch, batch=args.batch, latent=args.latent, precision=args.precision,
                     compile_=args.compile, steps=args.steps, warmup=args.warmup, num_classes=args.classes)]
    for run in runs:
        result = bench(device=device, **run)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()

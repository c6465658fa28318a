"""How many steps a tiny DiT needs before its class-conditional samples of builtin:shapes show the shape asked for.

One model, in this process, on every 16x16 square shapes image (the shapes preset's data, latents and training
settings: flow-matching loss, AdamW, gradient clipping, EMA with warmup, label dropout), no pipeline and no
router: a learning curve that says which budget an ensemble run needs. Every `--every` steps the EMA model
samples 256 images (classes cycled, 32 Euler steps) at CFG 1 and at `--cfg`, and a shape-agnostic classifier
(worker/eval_buckets.py) trained on the training images judges them; its accuracy on 256 held-out real images
is the reference. Intervals are Wilson 95% over the 256 samples of one training seed (sampling error only).

    python benchmarks/shapes_budget.py --steps 5000 --every 1000 [--set model.patch_size=4]
(patch 2 is set first; a later --set wins.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="one expert's batch in the shapes preset")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--set", action="append", default=["model.patch_size=2"], metavar="KEY=VALUE")
    args = parser.parse_args()
    import copy

    import numpy as np
    import torch

    from common.config import resolve_config
    from worker.eval_buckets import train_grid_classifier
    from worker.evalmath import wilson_interval
    from worker.flow import cfg_velocity, drop_condition, flow_matching_loss, sample, sample_t
    from worker.models.dit import build_dit
    from worker.sources import discover
    from worker.step import make_optimizer, update_ema

    config = resolve_config("shapes", overrides=args.set)
    found = discover(config.data, config.seed)
    items, classes = found.items, found.num_classes
    x_all = torch.tensor(np.stack([i.array for i in items]))
    y_all = torch.tensor([i.label for i in items])
    x, y, x_held, y_held = x_all[:-256], y_all[:-256], x_all[-256:], y_all[-256:]
    size, channels = config.data.image_size, config.data.channels
    judge = train_grid_classifier({(size, size): (x, y)}, classes, seed=0)
    real = int((judge(x_held).argmax(-1) == y_held).sum())
    low, high = wilson_interval(real, 256)
    print(f"classifier on 256 real held-out images: {real / 256:.3f} [{low:.3f}, {high:.3f}]")

    torch.manual_seed(config.seed)
    model = build_dit(config.model, [channels, size, size], classes, None)
    ema, tc = copy.deepcopy(model).requires_grad_(False), config.training
    opt = make_optimizer(model, tc, torch.device("cpu"))
    g, start = torch.Generator().manual_seed(config.seed), time.perf_counter()

    def judged(scale: float) -> str:
        torch.manual_seed(1)
        want = torch.arange(256) % classes
        out = sample(lambda z, t: cfg_velocity(ema, z, t, want, torch.full_like(want, classes), scale),
                     torch.randn(256, channels, size, size), 32)
        k = int((judge(out.clamp(-1, 1)).argmax(-1) == want).sum())
        low, high = wilson_interval(k, 256)
        return f"CFG {scale:g}: {k / 256:.3f} [{low:.3f}, {high:.3f}]"

    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        pick = torch.randint(len(y), (args.batch,), generator=g)
        cond = drop_condition(y[pick], torch.rand(args.batch, generator=g) < config.model.label_dropout, classes)
        loss = flow_matching_loss(model, x[pick], torch.randn(x[pick].shape, generator=g),
                                  sample_t(args.batch, tc.timestep_sampling, g), cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        opt.step()
        update_ema(ema, model, step, tc)
        train_seconds += time.perf_counter() - tick
        if step % args.every == 0:
            with torch.no_grad():
                print(f"step {step:>6,} ({step * args.batch:,} images, {step * args.batch / train_seconds:.0f} img/s): "
                      f"{judged(1.0)}; {judged(args.cfg)}", flush=True)
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""One optimizer step of expert/router training, shared by `worker.train` and `benchmarks/train_throughput.py`,
so the configuration benchmarked is the one trained.

A step: forward + backward over the micro-batches (DDP all-reduces on the last one only), grad clipping,
AdamW, EMA. Mixed precision is bf16 autocast on CUDA with fp32 master weights, fp32 loss and fp32 EMA.
Under DDP with bf16 the gradients travel as bf16 (a comm hook: half the all-reduce bytes) and are
averaged back into the fp32 `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.config import TrainingConfig
from worker.devices import autocast, wants_compile

__all__ = ["StepParts", "make_optimizer", "wrap_for_training", "train_step", "update_ema"]

# (forward module, micro-batch index) -> (per-example loss [mb], router stats or None)
MicroLoss = Callable[[Callable, int], "tuple[Tensor, dict | None]"]


@dataclass
class StepParts:
    model: nn.Module      # the bare module: clipping, EMA and checkpoints see its parameters
    ema: nn.Module
    opt: torch.optim.Optimizer
    net: nn.Module        # DistributedDataParallel(model) when world > 1, else model
    fwd: Callable         # net, compiled when training.compile asks for it on this device
    device: torch.device
    tc: TrainingConfig
    world: int = 1

    def amp(self):
        return autocast(self.device, self.tc.precision)


def make_optimizer(model: nn.Module, tc: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with one fused kernel on CUDA (one foreach kernel per op on CPU). A resumed checkpoint
    restores only the optimizer state, so these construction options always come from here."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **fast)


def wrap_for_training(model: nn.Module, device: torch.device, tc: TrainingConfig, world: int,
                      bf16_grads: bool | None = None) -> tuple[nn.Module, Callable]:
    """(net, fwd): DDP when world > 1 (bf16 gradient all-reduce when training in bf16 on CUDA), then
    torch.compile where training.compile asks for it on this device."""
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if bf16_grads if bf16_grads is not None else (device.type == "cuda" and tc.precision == "bf16"):
            net.register_comm_hook(None, bf16_all_reduce)
    return net, (torch.compile(net) if wants_compile(tc.compile, device) else net)


def bf16_all_reduce(group, bucket):  # no annotations: DDP checks them, and they are strings in this module
    """DDP comm hook (process group, dist.GradBucket) -> Future[Tensor]: each gradient bucket is divided by
    the world size, all-reduced as bf16 (half the bytes of fp32) and written back into the fp32 bucket.
    Works with NCCL and gloo alike."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def write_back(done: torch.futures.Future) -> Tensor:
        buffer.copy_(done.value()[0])
        return buffer
    return future.then(write_back)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, tc: TrainingConfig) -> None:
    # Warmup (1 + step) / (10 + step) lets short runs use the EMA; the paper uses a flat 0.9999.
    decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_step(parts: StepParts, micro_loss: MicroLoss, accum: int, per_worker_batch: int, lr: float, step: int,
               on_loss: Callable[[Tensor, dict | None], None] | None = None) -> None:
    """`accum` micro-batches of forward/backward, then clip, AdamW at `lr`, EMA. Each worker divides its loss
    sum by its share of the batch; DDP averages the workers, so the gradient is the mean over the batch."""
    for m in range(accum):
        sync = parts.net.no_sync() if parts.world > 1 and m < accum - 1 else nullcontext()
        with sync, parts.amp():
            loss, stats = micro_loss(parts.fwd, m)
        (loss.sum() / per_worker_batch).backward()
        if on_loss is not None:
            on_loss(loss.detach(), stats)
    for group in parts.opt.param_groups:
        group["lr"] = lr
    if parts.tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.tc.grad_clip, foreach=True)
    parts.opt.step()
    parts.opt.zero_grad(set_to_none=True)
    update_ema(parts.ema, parts.model, step, parts.tc)

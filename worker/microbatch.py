"""Automatic micro-batch (island `per_worker_batch: auto`): the largest micro-batch that fits the GPU.

Candidates are the divisors of the worker's share of the effective batch, so gradient accumulation covers
the rest exactly: the effective batch, the random draws of each step (made for the whole batch, then
sliced) and FLOP matching between experts are unchanged. Whether a candidate fits is a short probe, one
forward + backward at that size, which must stay under (1 - margin) of the card's memory after reserving
the AdamW moments (and DDP's gradient buckets) that the probe does not allocate yet. On CPU there is
nothing to probe: the configured micro-batch is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class MicroBatchError(RuntimeError):
    """Not even a micro-batch of 1 fits; names the job and the memory it would need."""


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def largest_fitting(share: int, fits: Callable[[int], bool]) -> int | None:
    """The largest divisor of `share` for which `fits` holds (fits must be monotone: smaller never fails
    where larger succeeds). One probe when the whole share fits, else a binary search over the divisors."""
    candidates = divisors(share)
    if fits(candidates[-1]):
        return candidates[-1]
    lo, hi = -1, len(candidates) - 1  # candidates[hi] does not fit; candidates[lo] fits (lo = -1: none known)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return candidates[lo] if lo >= 0 else None


def cuda_fits(probe: Callable[[int], None], device: torch.device, margin: float = 0.1,
              reserve_bytes: int = 0) -> Callable[[int], bool]:
    """A `fits` predicate for `largest_fitting`: run `probe(mb)`; an OOM or a peak above the budget is a no."""
    total = torch.cuda.get_device_properties(device).total_memory
    budget = (1.0 - margin) * total - reserve_bytes

    def fits(mb: int) -> bool:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            probe(mb)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            ok, peak = False, float("nan")
        else:
            peak = torch.cuda.max_memory_reserved(device)
            ok = peak <= budget
        torch.cuda.empty_cache()
        log.info("micro-batch probe %d: %s (peak %.2f GiB, budget %.2f GiB)", mb, "fits" if ok else "does not fit",
                 peak / 2**30, budget / 2**30)
        return ok
    return fits


def choose_micro_batch(share: int, configured: int, device: torch.device, probe: Callable[[int], None],
                       reserve_bytes: int, what: str, margin: float = 0.1) -> int:
    """`configured` on CPU; on CUDA the largest divisor of `share` whose probe fits."""
    if device.type != "cuda":
        return configured
    found = largest_fitting(share, cuda_fits(probe, device, margin, reserve_bytes))
    if found is None:
        raise MicroBatchError(f"{what}: not even a micro-batch of 1 fits in {(1 - margin):.0%} of "
                              f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB on {device}")
    log.info("%s: automatic micro-batch %d of %d per worker (%d accumulation steps)", what, found, share, share // found)
    return found


def agree(micro_batch: int, device: torch.device) -> int:
    """Every DDP worker must accumulate the same number of micro-batches: the smallest choice wins."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return micro_batch
    value = torch.tensor([micro_batch], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())

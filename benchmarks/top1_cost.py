"""Per-step cost of top-1 ensemble sampling vs one expert of the same size (router included).

Top-1 re-routes every step: one router forward on the batch, then each expert runs only on the rows
routed to it, so a step should cost about one expert forward plus the router. Measured side by
side in one process for several shapes; reports wall time and counted FLOPs. Target: <= 1.15x.
Top-1 dispatches through `worker.sampler.routed_velocity` (one sort by expert and one host sync per step);
on CUDA the expert slices are padded to bucket sizes, and the exact (unpadded) dispatch is timed beside it,
with the host syncs of one step counted by CUDA's sync debug mode.

    python benchmarks/top1_cost.py [--json out.json] [--jsonl] [--device cpu|cuda] [--cases digits,S2,B2,XL2]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from worker.models.dit import DiT
from worker.models.router import Router
from worker.sampler import EnsembleVelocity, guided

# key: (name, latent C, H, patch, expert dims, router dims, K, batch, cfg, classes)
CASES = {
    "digits": ("digits preset (router width 32, depth 2)", 1, 8, 2, dict(width=64, depth=4, heads=4),
               dict(width=32, depth=2, heads=2), 4, 256, 2.0, 10),
    "digits-big-router": ("digits, router = expert size (earlier preset)", 1, 8, 2, dict(width=64, depth=4, heads=4),
                          dict(width=64, depth=4, heads=4), 4, 256, 2.0, 10),
    "S2": ("S/2 expert, 16x16x4 latents, router width 128 x 4", 4, 16, 2, dict(width=384, depth=12, heads=6),
           dict(width=128, depth=4, heads=4), 8, 32, 1.5, 1000),
    "B2": ("B/2 expert, 32x32x4 latents, B/2 router, K 8", 4, 32, 2, dict(width=768, depth=12, heads=12),
           dict(width=768, depth=12, heads=12), 8, 64, 1.5, 1000),
    "XL2": ("XL/2 expert, 32x32x4 latents, B/2 router, K 8 (paper)", 4, 32, 2, dict(width=1152, depth=28, heads=16),
            dict(width=768, depth=12, heads=12), 8, 32, 1.5, 1000),
}
DEFAULT_CASES = {"cpu": "digits,digits-big-router,S2", "cuda": "digits,S2,B2,XL2"}


def _time(fn, x, t, repeats: int) -> float:
    fn(x, t)  # warm up (allocations, kernels)
    if x.is_cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x, t)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _flops(fn, x, t) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(x, t)
    return counter.get_total_flops()


def _host_syncs(fn, x, t) -> int | None:
    """Synchronising CUDA calls made by one step (CUDA's sync debug mode warns on each)."""
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(x, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def run_case(name: str, case: tuple, device: str, repeats: int) -> dict:
    C, H, patch, ed, rd, K, batch, cfg, classes = case
    torch.manual_seed(0)
    common = dict(in_channels=C, input_size=(H, H), patch_size=patch, conditioning="class", num_classes=classes)
    with torch.device(device):  # initialised where they run: K XL/2 experts take minutes to initialise on a CPU
        experts = [DiT(**common, **ed).eval() for _ in range(K)]
        router = Router(in_channels=C, input_size=(H, H), patch_size=patch, num_experts=K, **rd).eval()
    for e in experts:  # non-zero outputs (a fresh DiT outputs zeros)
        torch.nn.init.normal_(e.final.linear.weight, std=0.02)
    spread = 100.0 * torch.nn.functional.one_hot(torch.arange(batch, device=device) % K, K)  # [batch, K]
    cond = torch.arange(batch, device=device) % classes
    x = torch.randn(batch, C, H, H, device=device)
    t = torch.full((batch,), 0.5, device=device)
    fns = [guided(e, cfg, e.null_class) for e in experts]
    # The router's forward is paid in full; a fixed offset then spreads the rows evenly over the K experts
    # (B / K rows each: the most dispatch work top-1 can meet). A freshly initialised router sends every row
    # to the same expert, which would measure one expert, not the dispatch.
    route = lambda x, t: router(x, t) + spread  # noqa: E731
    top1 = EnsembleVelocity(fns, route, "top1", cond=cond)
    single = lambda x, t: fns[0](x, t, cond)  # noqa: E731
    routed = torch.bincount(route(x, t).argmax(1), minlength=K).tolist()
    t_single, t_top1 = _time(single, x, t, repeats), _time(top1, x, t, repeats)
    t_exact = t_top1  # on CPU top-1 is the exact (unpadded) dispatch; on CUDA time it beside the bucketed one
    if x.is_cuda:
        t_exact = _time(EnsembleVelocity(fns, route, "top1", cond=cond, bucket=False), x, t, repeats)
    f_single, f_top1 = _flops(single, x, t), _flops(top1, x, t)
    return {"case": name, "device": torch.cuda.get_device_name() if x.is_cuda else "cpu", "batch": batch, "K": K,
            "cfg": cfg, "rows_per_expert": routed,
            "ms_per_step_single": round(t_single * 1e3, 3), "ms_per_step_top1": round(t_top1 * 1e3, 3),
            "ms_per_step_top1_unbucketed": round(t_exact * 1e3, 3),
            "time_ratio": round(t_top1 / t_single, 3), "gflops_single": round(f_single / 1e9, 4),
            "gflops_top1": round(f_top1 / 1e9, 4), "flop_ratio": round(f_top1 / f_single, 3),
            "host_syncs_per_step_single": _host_syncs(single, x, t), "host_syncs_per_step_top1": _host_syncs(top1, x, t),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", help=f"comma-separated keys of {', '.join(CASES)} (default: per device)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json")
    parser.add_argument("--jsonl", action="store_true", help="one JSON line per case on stdout, no table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = (args.cases or DEFAULT_CASES["cuda" if args.device == "cuda" else "cpu"]).split(",")
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        raise SystemExit(f"--cases {unknown[0]}: unknown; choose from {', '.join(CASES)}")
    rows = []
    for key in keys:
        rows.append(run_case(CASES[key][0], CASES[key][1:], args.device, args.repeats))
        if args.jsonl:
            print(json.dumps({"bench": "top1_cost", **rows[-1]}), flush=True)
    if args.jsonl:
        return
    print("| case | device | batch | K | ms/step single | ms/step top-1 | time ratio | GFLOPs single | GFLOPs top-1 | FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['device']} | {r['batch']} | {r['K']} | {r['ms_per_step_single']} | {r['ms_per_step_top1']} "
              f"| {r['time_ratio']}x | {r['gflops_single']} | {r['gflops_top1']} | {r['flop_ratio']}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

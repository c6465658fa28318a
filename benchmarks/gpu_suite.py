"""Every GPU measurement in one unattended call, each step time-boxed so one failure cannot eat the rest.
Prints JSON lines only on stdout: each step's own results, then a status line per step.

    PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py [--budget 480]

Steps, in order of value (the budget cuts the tail):
 1. environment: torch, CUDA, the device; and that the benchmark modules import without Ray, s3fs or boto3;
 2. benchmarks/train_throughput.py --suite h200, one subprocess per configuration: XL/2 b128 and B/2 b256
    at 4x32x32, 1000 classes, as fp32+TF32 eager, bf16 eager, then bf16 + torch.compile;
 3. benchmarks/top1_cost.py --device cuda: top-1 sampling cost, bucketed and exact, host syncs per step;
 4. benchmarks/encoder_throughput.py: DINOv2-L/14 with on-device preprocessing, SD VAE fp32/bf16, vs the PIL processor;
 5. benchmarks/cuda_smoke.py: worker.train.train end to end on CUDA (bf16, compile auto, automatic micro-batch,
    resume into fused AdamW, deterministic mode bit-identical);
 6. 2-process DDP: skipped (NCCL needs one GPU per rank; the bf16 all-reduce hook is tested on CPU with gloo).
Only the Python standard library is imported here; the steps import torch themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BLOCKED = ("ray", "s3fs", "boto3", "botocore")
# Libraries probe for optional packages with importlib.util.find_spec, so the check looks at what was
# actually imported rather than refusing the probes.
ENV_CHECK = f"""
import json, sys
import torch
for m in ('benchmarks.train_throughput', 'benchmarks.top1_cost', 'benchmarks.encoder_throughput',
          'benchmarks.cuda_smoke', 'worker.train', 'worker.ensemble', 'worker.encoders'):
    __import__(m)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})
assert not loaded, f"the GPU benchmarks imported {{loaded}}"
cuda = torch.cuda.is_available()
print(json.dumps({{"bench": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name() if cuda else None, "cuda_available": cuda,
                  "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
                  "imports_without": {list(BLOCKED)!r}}}))
"""


def steps() -> list[tuple[str, list[str], int]]:
    """(name, command, cap in seconds)."""
    tt = [PY, "benchmarks/train_throughput.py", "--suite", "h200", "--only"]
    return ([("environment", [PY, "-c", ENV_CHECK], 90),
             ("train_throughput eager (XL/2, B/2; fp32+TF32, bf16)", tt + ["0,1,2,3"], 200),
             ("train_throughput XL/2 bf16+compile", tt + ["4"], 150),
             ("train_throughput B/2 bf16+compile", tt + ["5"], 110)]
            + [("top1_cost", [PY, "benchmarks/top1_cost.py", "--device", "cuda", "--jsonl", "--repeats", "3"], 90),
               ("encoder_throughput", [PY, "benchmarks/encoder_throughput.py", "--device", "cuda"], 90),
               ("cuda_smoke", [PY, "benchmarks/cuda_smoke.py"], 150)])


def run_step(name: str, command: list[str], timeout: float, env: dict[str, str]) -> dict:
    """Run one step; pass its JSON lines through to stdout; return its status line."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)  # its own process group: a timeout kills compile workers too
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
        err.seek(0)
        tail = err.read().strip().splitlines()[-4:]
    results = 0
    for line in out.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            results += 1
    status = {"step": name, "status": "timeout" if code is None else ("ok" if code == 0 else f"exit {code}"),
              "wall_s": round(time.perf_counter() - start, 1), "results": results}
    if code != 0:
        status["stderr_tail"] = tail
    return status


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite")
    p.add_argument("--only", help="comma-separated step name prefixes to run (default: all)")
    args = p.parse_args()
    deadline = time.perf_counter() + args.budget
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    statuses = []
    for name, command, cap in steps():
        if args.only and not any(name.startswith(prefix) for prefix in args.only.split(",")):
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            statuses.append({"step": name, "status": "skipped", "reason": f"suite budget of {args.budget:.0f} s spent"})
        else:
            statuses.append(run_step(name, command, min(cap, left), env))
        print(json.dumps({"bench": "gpu_suite", **statuses[-1]}), flush=True)
    print(json.dumps({"bench": "gpu_suite", "step": "ddp 2-process", "status": "skipped",
                      "reason": "one GPU on this machine; NCCL needs one GPU per rank (bf16 hook tested on CPU/gloo)"}))
    print(json.dumps({"bench": "gpu_suite", "step": "summary", "ok": sum(s["status"] == "ok" for s in statuses),
                      "of": len(statuses)}), flush=True)


if __name__ == "__main__":
    main()

"""The GPU benchmark scripts run unattended on a bare GPU box: no Ray, s3fs or boto3 at import, and a step
that overruns its time box is killed and reported while the suite goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmarks_import_without_ray_s3fs_or_boto3():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.gpu_suite import ENV_CHECK
    finally:
        sys.path.remove(str(ROOT))
    out = subprocess.run([sys.executable, "-c", ENV_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["imports_without"] == ["ray", "s3fs", "boto3", "botocore"]
    blocked = subprocess.run([sys.executable, "-c", ENV_CHECK.replace("import torch\n", "import torch\nimport ray\n", 1)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert blocked.returncode != 0 and "the GPU benchmarks imported ['ray'" in blocked.stderr  # the check can fail


def test_a_step_past_its_time_box_is_killed_and_reported(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.gpu_suite import run_step
    finally:
        sys.path.remove(str(ROOT))
    code = "import json, time; print(json.dumps({'bench': 'x', 'v': 1}), flush=True); time.sleep(60)"
    status = run_step("slow", [sys.executable, "-c", code], timeout=3, env=dict(os.environ))
    assert status["status"] == "timeout" and status["results"] == 1 and status["wall_s"] < 30
    assert json.loads(capsys.readouterr().out.strip()) == {"bench": "x", "v": 1}
    failed = run_step("bad", [sys.executable, "-c", "import sys; sys.exit('no CUDA here')"], timeout=30, env=dict(os.environ))
    assert failed["status"] == "exit 1" and failed["stderr_tail"] == ["no CUDA here"]

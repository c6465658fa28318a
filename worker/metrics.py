"""Training metrics: Ray metrics (Prometheus via the Ray dashboard agent) and a matmul peak for MFU.

Gauges ddm_images_seen, ddm_loss, ddm_images_per_second, ddm_eta_seconds and the counter
ddm_retries_total are tagged (expert, island). Everything here is a no-op when Ray is not initialised,
so the same training loop runs in a plain process.
"""

from __future__ import annotations

import time

import torch

_TAGS = ("expert", "island")
_METRICS: dict | None = None
_GAUGES = {"ddm_images_seen": ("nimg", "Images seen by this training job."),
           "ddm_loss": ("loss", "Training loss (mean over the last log interval)."),
           "ddm_images_per_second": ("img_per_s", "Training throughput, images per second."),
           "ddm_eta_seconds": ("eta_s", "Estimated seconds until the job reaches duration_nimg.")}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _metrics() -> dict:
    global _METRICS
    if _METRICS is None:
        from ray.util.metrics import Counter, Gauge
        _METRICS = {name: Gauge(name, description=desc, tag_keys=_TAGS) for name, (_, desc) in _GAUGES.items()}
        _METRICS["ddm_retries_total"] = Counter("ddm_retries_total", description="Retries of a failed training job.",
                                                tag_keys=_TAGS)
    return _METRICS


def report_progress(job_name: str, island: str, progress: dict) -> None:
    """Set the gauges from a progress dict ({"nimg", "loss", "img_per_s", "eta_s", ...})."""
    if not _ray_ready():
        return
    metrics, tags = _metrics(), {"expert": job_name, "island": island}
    for name, (key, _) in _GAUGES.items():
        if progress.get(key) is not None:
            metrics[name].set(float(progress[key]), tags=tags)


def count_retry(job_name: str, island: str) -> None:
    """Increment ddm_retries_total (called by whoever retries a failed job)."""
    if _ray_ready():
        _metrics()["ddm_retries_total"].inc(1.0, tags={"expert": job_name, "island": island})


def matmul_tflops(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None,
                  seconds: float = 0.5) -> float:
    """Measured dense matmul throughput (TFLOP/s): the denominator of MFU. bf16 on GPU, fp32 on CPU."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            a @ b
        iters += 5
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12

"""Training metrics: Ray metrics (Prometheus via the Ray dashboard agent), TensorBoard event files in
the run store, and a matmul peak for MFU.

Per job (tags expert, island), set by the job's rank 0: gauges ddm_images_seen, ddm_loss,
ddm_images_per_second, ddm_eta_seconds. Set by the driver, which outlives every job: the counter
ddm_retries_total (created at 0 for every job when the train stage starts, so a panel never shows
"No data") and the gauge ddm_job_images_seen, which keeps each job's count after its actor has exited,
so run totals summed over it never drop. Ray metrics are a no-op when Ray is not initialised, so the
same training loop runs in a plain process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch

log = logging.getLogger(__name__)

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
        _METRICS["ddm_job_images_seen"] = Gauge("ddm_job_images_seen", tag_keys=_TAGS,
                                                description="Images seen by a training job, kept after it ends (driver).")
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


def init_retries(jobs: dict[str, str]) -> None:
    """Create ddm_retries_total at 0 for each {job: island}, so rate()/increase() panels have a series."""
    if not _ray_ready():
        return
    counter = _metrics()["ddm_retries_total"]
    for job_name, island in jobs.items():
        # Counter.inc refuses 0; recording 0 exports the series at 0 without counting anything.
        counter._record(0.0, tags={"expert": job_name, "island": island})


def report_job_images(job_name: str, island: str, images_seen: int, moved_from: str | None = None) -> None:
    """Driver-side ddm_job_images_seen: survives the job's actor. A job that moved to another island
    (a retry placed elsewhere) zeroes its old series, so sums over islands count it once."""
    if not _ray_ready():
        return
    gauge = _metrics()["ddm_job_images_seen"]
    if moved_from is not None and moved_from != island:
        gauge.set(0.0, tags={"expert": job_name, "island": moved_from})
    gauge.set(float(images_seen), tags={"expert": job_name, "island": island})


def tensorboard_prefix(job_name: str) -> str:
    """Where a job's TensorBoard event files live in the run store: `tensorboard --logdir <run>/tb`."""
    return f"tb/{job_name}"


class TensorBoardLog:
    """One TensorBoard event file per training attempt, under `tb/<job>/` in the run store.

    tensorboardX writes to a local scratch file; after every row the whole file (a few KB) is copied
    into the store, so the store stays the only place results live, on file://, s3:// or memory://.
    """

    def __init__(self, store, prefix: str, enabled: bool = True) -> None:
        self.store, self.prefix, self.writer, self.path = store, prefix, None, None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # optional: Ray ships it; a bare environment still trains
            log.info("tensorboardX is not installed; no TensorBoard event files for %s", prefix)
            return
        self._scratch = tempfile.TemporaryDirectory(prefix="ddm-tb-")
        self.writer = SummaryWriter(logdir=self._scratch.name, flush_secs=3600)

    def add(self, row: dict, nimg: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("nimg", "step", "time", "duration_nimg", "resumed_from_nimg") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", float(value), global_step=nimg)
        self.writer.flush()
        for name in os.listdir(self._scratch.name):
            with open(os.path.join(self._scratch.name, name), "rb") as handle:
                self.store.write_bytes(f"{self.prefix}/{name}", handle.read())

    def close(self) -> None:
        """Stop the writer's thread and remove the scratch folder (every row is already in the store)."""
        if self.writer is not None:
            self.writer.close()
            self._scratch.cleanup()
            self.writer = None


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

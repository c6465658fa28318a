"""Where models run, and the CUDA numerics settings every job applies the same way.

- `resolve_device("auto")` is CUDA when a device is visible, else CPU; asking for "cuda" where none is
  visible is an error, never a silent fall-back.
- TF32 (`tf32=True`, the default): fp32 matmuls and convolutions on Ampere or newer run on tensor cores
  with a 10-bit mantissa, ~8x the fp32 rate; fp32 master weights, the loss and the optimizer are unaffected.
- `deterministic=True`: `torch.use_deterministic_algorithms(True)`, `CUBLAS_WORKSPACE_CONFIG=:4096:8`,
  cuDNN without autotuning and Inductor without atomics. CUDA runs then repeat bit for bit, at a cost
  (slower SDPA backward, conv weight gradients and scatter-adds; typically 10-30% of step time). Without it,
  bit-exact resume holds on CPU only.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager, nullcontext

import torch

from common.errors import DDMError


class DeviceError(DDMError, RuntimeError):
    """A requested accelerator is not there; one line naming what asked for it and the node (exit 1)."""


def resolve_device(preference: str = "auto", what: str = "--device") -> torch.device:
    """"auto" -> CUDA if visible else CPU; "cuda" without a visible device is a DeviceError naming `what`."""
    if preference not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{what} {preference}: unknown device; choose auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{what} cuda: no CUDA device is visible on node {socket.gethostname()}")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def training_device(use_gpu: bool, island: str, job: str) -> torch.device:
    """The device of a job that runs outside Ray Train: a `use_gpu` job never falls back to CPU."""
    if use_gpu and not torch.cuda.is_available():
        raise DeviceError(f"island {island}: {job} has use_gpu = true but no CUDA device is visible on node "
                          f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda") if use_gpu else torch.device("cpu")


def check_training_device(device: torch.device, use_gpu: bool, island: str, job: str) -> None:
    """A device handed in (e.g. by Ray Train) must match the job's use_gpu."""
    if use_gpu and device.type != "cuda":
        raise DeviceError(f"island {island}: {job} has use_gpu = true but runs on {device} on node "
                          f"{socket.gethostname()} (no CUDA device visible to this worker)")


def configure_numerics(tf32: bool = True, deterministic: bool = False) -> None:
    """Process-wide matmul/conv settings; call before the first CUDA matmul (cuBLAS reads its workspace
    setting when its handle is created)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32  # also float32_matmul_precision "high", which Inductor reads
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        try:
            import torch._inductor.config as inductor
            inductor.deterministic = True  # no atomics / autotuned reductions in compiled kernels
        except (ImportError, AttributeError):
            pass
    torch.use_deterministic_algorithms(deterministic)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CUDA; CPU (and fp32) runs plain fp32."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", torch.bfloat16)
    return nullcontext()


def wants_compile(setting: bool | str, device: torch.device) -> bool:
    """training.compile: True compiles anywhere, "auto" on CUDA only, False never."""
    return setting is True or (setting == "auto" and device.type == "cuda")

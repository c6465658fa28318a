"""The shared training step's surroundings: the bf16 gradient all-reduce under DDP (2 real gloo processes),
the automatic micro-batch search, compile / TF32 / deterministic switches, device resolution."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.config import IslandConfig, TrainingConfig
from common.presets import PRESETS
from worker.devices import DeviceError, configure_numerics, resolve_device, wants_compile
from worker.microbatch import choose_micro_batch, divisors, largest_fitting
from worker.step import make_optimizer, wrap_for_training

torch.set_num_threads(1)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    result = {}
    for bf16_grads in (True, None):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        net, fwd = wrap_for_training(model, torch.device("cpu"), TrainingConfig(precision="bf16"), 2, bf16_grads)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1 + rank)) * (1 + rank / 3)
        fwd(x).square().sum().backward()
        result[bf16_grads] = (model.weight.grad, fwd is net)
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_all_reduces_gradients_in_bf16(tmp_path):
    """Two gloo processes: with the bf16 hook each gradient travels as bf16 (averaged in bf16, copied back
    into the fp32 .grad); without it the average is exact. On CPU the default is no hook (fp32 training)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    grads = []
    for rank in range(2):
        model.zero_grad()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1 + rank)) * (1 + rank / 3)
        model(x).square().sum().backward()
        grads.append(model.weight.grad.clone())
    exact = (grads[0] + grads[1]) / 2
    in_bf16 = ((grads[0].bfloat16() / 2) + (grads[1].bfloat16() / 2)).float()
    assert not torch.allclose(in_bf16, exact, rtol=1e-6, atol=1e-6)  # the two cases are distinguishable
    out = str(tmp_path / "grad")
    mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=2)
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    for bf16_grads, want in ((True, in_bf16), (None, exact)):
        (g0, compiled0), (g1, _) = got[0][bf16_grads], got[1][bf16_grads]
        assert torch.equal(g0, g1) and compiled0  # same on both ranks; fwd is the bare DDP (no compile on CPU)
        torch.testing.assert_close(g0, want, rtol=1e-6, atol=1e-6)


def test_micro_batch_search_finds_the_largest_divisor_that_fits():
    probes: list[int] = []

    def fits_up_to(limit):
        def fits(mb):
            probes.append(mb)
            return mb <= limit
        return fits
    assert divisors(48) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert largest_fitting(48, fits_up_to(13)) == 12 and len(probes) <= 1 + 4  # one try, then a binary search
    probes.clear()
    assert largest_fitting(48, fits_up_to(100)) == 48 and probes == [48]  # fits at once: one probe
    assert largest_fitting(48, fits_up_to(0)) is None
    assert largest_fitting(7, fits_up_to(6)) == 1  # a prime share: no accumulation split but 1
    for share in (1, 12, 32, 96, 256):
        for limit in range(1, share + 2):
            got = largest_fitting(share, fits_up_to(limit))
            assert got == max(d for d in divisors(share) if d <= limit)
    # On CPU nothing is probed: the configured micro-batch stays.
    assert choose_micro_batch(32, 32, torch.device("cpu"), probe=lambda mb: 1 / 0, reserve_bytes=0, what="x") == 32


def test_auto_micro_batch_config_keeps_the_effective_batch():
    from common.presets import digits
    from worker.train import expert_job, router_job

    config = digits()
    island = IslandConfig(name="gpu", num_workers=2, per_worker_batch="auto")
    job = expert_job(config, 0, island)
    assert (job.batch, job.micro_batch, job.auto_micro_batch) == (config.expert_batch, config.expert_batch // 2, True)
    assert router_job(config, island).auto_micro_batch
    fixed = expert_job(config, 0, IslandConfig(name="gpu", num_workers=2, per_worker_batch=8))
    assert (fixed.micro_batch, fixed.auto_micro_batch) == (8, False)


def test_compile_tf32_and_deterministic_switches(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wants_compile(True, cpu) and wants_compile("auto", cuda) and wants_compile(True, cuda)
    assert not wants_compile("auto", cpu) and not wants_compile(False, cuda)
    assert TrainingConfig().tf32 is True and TrainingConfig().deterministic is False
    for name in ("imagenet-xl2", "laion-xl2"):  # the GPU presets compile on CUDA (and only there)
        config = PRESETS[name]()
        assert config.training.compile == "auto" and config.router.training.compile == "auto", name
    assert PRESETS["digits"]().training.compile is False
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_numerics(tf32=True, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.deterministic
    finally:
        configure_numerics(tf32=True, deterministic=False)
        torch.backends.cudnn.deterministic = False
    assert not torch.are_deterministic_algorithms_enabled()


def test_asking_for_cuda_where_none_is_visible_names_the_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=f"^--device cuda: no CUDA device is visible on node {socket.gethostname()}$"):
        resolve_device("cuda")
    assert make_optimizer(torch.nn.Linear(2, 2), TrainingConfig(), torch.device("cpu")).param_groups[0]["foreach"]

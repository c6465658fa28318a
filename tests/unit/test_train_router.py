"""The router (paper Algorithm 1) on a Gaussian mixture whose posterior p(k | x_t, t) is known in closed form."""

from __future__ import annotations

import numpy as np
import torch

from common.config import ModelConfig, TrainingConfig
from common.storage import RunStore
from tests.partitions import gmm, write_router_partition
from worker.checkpoint import load_export
from worker.train import TrainJob, job_store, train

MEANS = np.array([[1.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, -1.0, -1.0, 0.5]])
STD, PI = 0.3, np.array([0.4, 0.3, 0.2, 0.1])
TV_TOL = 0.06  # mean total-variation distance to the exact posterior, averaged over the t grid
T_GRID = (0.05, 0.3, 0.5, 0.7, 0.9)


def exact_posterior(x_t: torch.Tensor, t: float) -> torch.Tensor:
    """softmax_k(log pi_k + log N(x_t; (1 - t) mu_k, ((1 - t)^2 s^2 + t^2) I))  (x_t | k is Gaussian)."""
    var = (1 - t) ** 2 * STD**2 + t**2
    mu = torch.from_numpy((1 - t) * MEANS).float()                                  # [K, D]
    sq = (x_t.flatten(1)[:, None, :] - mu[None]).square().sum(-1)                  # [N, K]
    return torch.softmax(torch.from_numpy(np.log(PI)).float() - sq / (2 * var), dim=-1)  # [N, K]


def test_router_learns_the_gmm_posterior(tmp_path):
    torch.set_num_threads(1)
    store = RunStore(str(tmp_path / "run"))
    x, comp = gmm(8192, MEANS, STD, PI, seed=0)
    write_router_partition(store, x, torch.full_like(comp, -1), comp, num_experts=4)
    job = TrainJob(name="router", kind="router", prefix="router", manifest_key="router/manifest.json",
                   model=ModelConfig(size="tiny", patch_size=1, depth=2, conditioning="none", label_dropout=0.0),
                   training=TrainingConfig(duration_nimg=128 * 300, lr=2e-3, ema_decay=0.99, timestep_sampling="uniform",
                                           checkpoint_every_nimg=10**7, log_every_nimg=128 * 100),
                   batch=128, micro_batch=128, seed=0, num_experts=4)
    train(job, job_store(store, job))
    router, record = load_export(store, "router")
    assert record.kind == "router" and "ece" in record.final_metrics and "acc_t0.00-0.20" in record.final_metrics

    x_test, k_test = gmm(4096, MEANS, STD, PI, seed=1)
    gen = torch.Generator().manual_seed(2)
    tvs, report = [], []
    for t in T_GRID:
        x_t = (1 - t) * x_test + t * torch.randn(x_test.shape, generator=gen)
        with torch.no_grad():
            pred = router(x_t, torch.full((len(x_t),), t)).softmax(-1)
        exact = exact_posterior(x_t, t)
        tv = 0.5 * (pred - exact).abs().sum(-1).mean().item()
        acc, bayes = (pred.argmax(-1) == k_test).float().mean().item(), (exact.argmax(-1) == k_test).float().mean().item()
        tvs.append(tv)
        report.append(f"t={t}: acc {acc:.3f} (Bayes {bayes:.3f}) TV {tv:.3f}")
        if t <= 0.3:  # well above chance (0.25) and close to the Bayes-optimal classifier
            assert acc > 0.9 and acc > bayes - 0.03, report[-1]
    print("\n".join(report))
    assert np.mean(tvs) < TV_TOL, report
    assert max(tvs) < 2 * TV_TOL, report

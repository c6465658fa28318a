"""Evaluation maths: GMM closed forms against Monte-Carlo, distances, the digit classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.evalmath import (GMM, frechet_distance, mmd_rbf, mode_coverage, sliced_wasserstein,
                             train_digit_classifier)


@pytest.fixture
def gmm() -> GMM:
    return GMM(weights=torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64),
               means=torch.tensor([[2.0, 0, 0, 0], [-2.0, 1, 0, 0], [0.0, -2, 1, 0]], dtype=torch.float64),
               stds=torch.tensor([0.5, 0.8, 0.6], dtype=torch.float64))


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_posterior_and_velocity_match_monte_carlo(gmm, t):
    """Importance sampling over the data: p(x0 | x_t) is proportional to N(x_t; (1 - t) x0, t^2 I)."""
    g = torch.Generator().manual_seed(0)
    x0, k = gmm.sample(400_000, g)                                    # [N, D], [N]
    queries = (1 - t) * gmm.sample(5, g)[0] + t * torch.randn(5, 4, generator=g, dtype=torch.float64)
    for x in queries:
        logw = -((x[None] - (1 - t) * x0) ** 2).sum(1) / (2 * t**2)
        w = (logw - logw.max()).exp()
        w = w / w.sum()
        p_mc = torch.stack([w[k == j].sum() for j in range(3)])
        x0_mc = (w[:, None] * x0).sum(0)
        v_mc = (x - x0_mc) / t                                        # E[v | x_t] = (x_t - E[x0 | x_t]) / t
        tt = torch.tensor([t])
        torch.testing.assert_close(gmm.posterior(x[None], tt)[0], p_mc, atol=0.02, rtol=0)
        torch.testing.assert_close(gmm.velocity(x[None], tt)[0], v_mc, atol=0.05 / t, rtol=0.02)


def test_expert_velocity_is_the_conditional_regression_target(gmm):
    """E[v | x_t, k] is the least-squares fit of eps - x0 within component k (checked by regression)."""
    g = torch.Generator().manual_seed(1)
    t = 0.5
    x0 = gmm.means[1] + gmm.stds[1] * torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    closed = gmm.expert_velocity(xt, torch.full((len(xt),), t))[:, 1]
    # closed form is affine in x_t; the residual of the true target must be uncorrelated with x_t
    resid = (eps - x0) - closed
    assert resid.mean(0).abs().max() < 0.01
    assert (resid * (xt - xt.mean(0))).mean(0).abs().max() < 0.01


def test_sample_distances_separate_right_from_wrong(gmm):
    g = torch.Generator().manual_seed(2)
    a, _ = gmm.sample(2000, g)
    b, _ = gmm.sample(2000, g)
    collapsed = gmm.means[0] + gmm.stds[0] * torch.randn(2000, 4, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, b) < 0.1 < sliced_wasserstein(a, collapsed)
    assert mmd_rbf(a, b) < 0.005 < mmd_rbf(a, collapsed)
    assert gmm.log_prob(a).mean() > gmm.log_prob(a + 1.0).mean()
    assert mode_coverage(a, gmm)[0] == 1.0
    assert mode_coverage(collapsed, gmm)[0] == pytest.approx(1 / 3)


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + 1  # closed form: 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, rng.normal(size=(20000, 3))) < 0.01


def test_digit_classifier_recognises_held_out_digits():
    torch.set_num_threads(1)
    model, accuracy = train_digit_classifier(seed=0, epochs=200)
    assert accuracy > 0.93
    assert model.features(torch.zeros(2, 1, 8, 8)).shape == (2, 64)

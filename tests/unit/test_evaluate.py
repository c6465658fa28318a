"""Evaluation maths: GMM closed forms against Monte-Carlo, distances, the digit classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.evalmath import GMM, frechet_distance, mmd_rbf, mode_coverage, sliced_wasserstein, train_digit_classifier


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


# ---- the Fréchet protocol and intervals -------------------------------------------------------------
def test_frechet_identical_sets_give_zero_and_shifted_sets_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))          # correlated features
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0])
    # same covariance, means differ by `shift`: the trace term vanishes, FD = ||shift||^2
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2 (a - mean): Tr(S + 4S - 2 (4 S^2)^1/2) = Tr(S), plus the squared distance of the means
    centred = a - a.mean(0)
    expected = np.trace(np.cov(a, rowvar=False)) + float(a.mean(0) @ a.mean(0))
    assert frechet_distance(a, 2 * centred) == pytest.approx(expected, rel=1e-5)


def test_reference_frechet_is_small_for_real_data_and_large_for_shifted_data():
    from worker.evalmath import reference_frechet

    rng = np.random.default_rng(1)
    pool, target = rng.normal(size=(3000, 4)), rng.normal(size=(500, 4))
    ref = reference_frechet(pool, target, n=400, draws=10, seed=0)
    assert ref["n"] == 400 and not ref["with_replacement"] and 0 <= ref["p2.5"] <= ref["mean"] <= ref["p97.5"] < 0.2
    shifted = reference_frechet(pool + 1.0, target, n=400, draws=10, seed=0)
    assert shifted["mean"] == pytest.approx(4.0, abs=0.3)              # ||(1, 1, 1, 1)||^2
    assert reference_frechet(pool[:100], target, n=400, draws=3)["with_replacement"]


def test_mean_interval_is_the_student_t_interval():
    from worker.evalmath import mean_interval

    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["ci95"] == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    assert mean_interval([5.0])["ci95"] is None


def test_heldout_mask_is_seeded_per_row_and_near_the_fraction():
    from worker.prepare_shard import heldout_mask

    index = np.arange(100_000)
    mask = heldout_mask(index, 0.2, seed=3)
    assert abs(mask.mean() - 0.2) < 0.01
    assert (heldout_mask(index[::-1], 0.2, seed=3) == mask[::-1]).all()       # row by row: order-free
    assert (np.concatenate([heldout_mask(c, 0.2, 3) for c in np.array_split(index, 7)]) == mask).all()
    assert (heldout_mask(index, 0.2, seed=4) != mask).mean() > 0.2             # the seed matters
    assert not heldout_mask(index, 0.0, seed=3).any()
    assert (heldout_mask(index, 0.1, seed=3) <= mask).all()                   # nested in the fraction


def test_router_buckets_include_where_sampling_starts():
    from worker.models.router import T_BUCKETS, calibration_metrics, expected_calibration_error

    assert T_BUCKETS[-2:] == (0.95, 1.0)
    t = torch.tensor([0.1, 0.97, 1.0, 0.5])
    m = calibration_metrics(t, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.9, 0.5, 0.5, 0.7]))
    assert m["acc_t0.95-1.00"] == 0.5 and m["acc_t0.00-0.20"] == 1.0
    # perfectly calibrated: confidence 0.5, half right -> ECE 0
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([0.55, 0.55])) == pytest.approx(0.05)


def test_bucket_floor_verdicts_need_the_seeds_interval_and_the_pooled_one_clear_of_the_floor():
    """Seeds that agree exactly give a t-interval of 0; the pooled Wilson interval still has a width."""
    from worker.eval_buckets import accuracy_cell, floor_verdict
    from worker.evalmath import wilson_interval

    assert accuracy_cell({"class_acc": 0.5, "class_acc_ci95": None}) == "0.500"  # one seed: no interval, not ± 0
    assert accuracy_cell({"class_acc": 0.5, "class_acc_ci95": 0.0421}) == "0.500 ± 0.042"
    assert floor_verdict({"class_acc": 0.8, "class_acc_ci95": 0.05}, 0.6) == "above"
    assert floor_verdict({"class_acc": 0.5, "class_acc_ci95": 0.05}, 0.6) == "below"
    assert floor_verdict({"class_acc": 0.58, "class_acc_ci95": 0.05}, 0.6) == "straddles"
    assert floor_verdict({"class_acc": 0.9, "class_acc_ci95": None}, 0.6) == "straddles"  # one seed: no claim

    assert wilson_interval(384, 384)[0] == pytest.approx(0.9901, abs=1e-4) and wilson_interval(0, 10)[0] == pytest.approx(0, abs=1e-12)
    perfect = {"class_acc": 1.0, "class_acc_ci95": 0.0, "pooled_wilson95": [0.9901, 1.0]}
    assert accuracy_cell(perfect) == "1.000 ± 0.000, pooled [0.990, 1.000]"
    assert floor_verdict(perfect, 0.625) == "above" and floor_verdict(perfect, 0.995) == "straddles"
    # few samples per seed that happen to agree: the seeds' t-interval says above, the pooled one does not
    lucky = {"class_acc": 0.8, "class_acc_ci95": 0.0, "pooled_wilson95": list(wilson_interval(8, 10))}
    assert floor_verdict(lucky, 0.6) == "straddles" and accuracy_cell(lucky).endswith(", pooled [0.490, 0.943]")
    assert floor_verdict({"class_acc": 0.3, "class_acc_ci95": 0.0, "pooled_wilson95": [0.2, 0.4]}, 0.6) == "below"

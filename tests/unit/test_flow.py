"""The interpolant, timestep sampling, the loss and the samplers (docs/design.md §2 convention)."""

from __future__ import annotations

import pytest
import torch

from worker.flow import cfg_velocity, drop_condition, flow_matching_loss, interpolate, sample, sample_t


def test_interpolant_endpoints_and_loss_target():
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    exact = lambda x, t, cond: eps - x0  # noqa: E731 - the true conditional velocity
    assert torch.equal(flow_matching_loss(exact, x0, eps, torch.rand(3)), torch.zeros(3))


def test_sample_t_schemes():
    gen = torch.Generator().manual_seed(0)
    u, ln = sample_t(20000, "uniform", gen), sample_t(20000, "logit_normal", gen)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median() - 0.5) < 0.01 and ln.std() < u.std()
    with pytest.raises(ValueError, match="timestep_sampling = 'cosine'"):
        sample_t(4, "cosine", gen)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_samplers_reach_a_point_mass(solver):
    # For data = a point c, v(x, t) = (x - c) / t and x_t - c is linear in t: both solvers land on c.
    c = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    out = sample(lambda x, t: (x - c) / t.view(-1, 1, 1, 1), torch.randn(6, 1, 2, 2), steps=4, solver=solver)
    assert torch.allclose(out, c.expand(6, -1, -1, -1), atol=1e-5)


def test_heun_beats_euler_on_a_gaussian():
    # Data N(0, s^2): x_t ~ N(0, (1-t)^2 s^2 + t^2); the exact velocity is linear in x with a t-dependent slope.
    s = 0.2
    vel = lambda x, t: x * (t - (1 - t) * s**2).view(-1, 1, 1, 1) / ((1 - t) ** 2 * s**2 + t**2).view(-1, 1, 1, 1)  # noqa: E731
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # The exact flow maps noise x1 to x0 = s x1 (x_t scales with the marginal std).
    err = {k: (sample(vel, noise, 32, k) - s * noise).abs().max().item() for k in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 4, err  # 2nd order: 5e-3 vs 4e-2 at 32 steps


def test_cfg_and_label_dropout():
    model = lambda x, t, cond: x * cond.view(-1, 1, 1, 1).float()  # noqa: E731 - a velocity linear in cond
    x, t = torch.ones(2, 1, 2, 2), torch.rand(2)
    cond, null = torch.tensor([3, 3]), torch.tensor([1, 1])
    assert torch.equal(cfg_velocity(model, x, t, cond, null, 1.0), model(x, t, cond))
    assert torch.allclose(cfg_velocity(model, x, t, cond, null, 2.5), x * (1 + 2.5 * (3 - 1)))
    labels = torch.tensor([4, -1, 7, 2])
    out = drop_condition(labels, torch.tensor([True, False, False, False]), null_class=10)
    assert out.tolist() == [10, 10, 7, 2]
    text = drop_condition(torch.ones(2, 3, 5), torch.tensor([False, True]), None)
    assert text[0].sum() == 15 and text[1].sum() == 0

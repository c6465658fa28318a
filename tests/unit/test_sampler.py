"""Inference strategies on toy callables: exact mixtures, routed rows only, renormalisation, CFG."""

from __future__ import annotations

import pytest
import torch

from worker.flow import sample as integrate
from worker.sampler import EnsembleVelocity, SamplerError, expert_weights, guided, mixture_velocity, posterior

K, B, SHAPE = 3, 12, (1, 2, 2)


class CountingExpert:
    """v_k(x) = a_k x + b_k, recording how many rows each call received."""

    def __init__(self, k: int) -> None:
        self.a, self.b = 0.5 + k, float(k) - 1.0
        self.rows: list[int] = []

    def __call__(self, x, t, cond):
        self.rows.append(x.shape[0])
        return self.a * x + self.b + 0 * t.view(-1, 1, 1, 1)


def toy_router(x, t):
    """Logits that depend on x, so different rows route to different experts."""
    s = x.flatten(1).sum(1, keepdim=True)  # [B, 1]
    return torch.cat([-s, torch.zeros_like(s), s], dim=1) * (2 - t.view(-1, 1))


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g)
    t = torch.full((B,), 0.4)
    return x, t, [CountingExpert(k) for k in range(K)]


def test_full_is_the_exact_posterior_weighted_mixture():
    x, t, experts = _setup()
    field = EnsembleVelocity(experts, toy_router, "full")
    v = field(x, t)
    p = toy_router(x, t).softmax(-1)
    want = sum(p[:, k].view(-1, 1, 1, 1) * (experts[k].a * x + experts[k].b) for k in range(K))
    torch.testing.assert_close(v, want)
    assert all(e.rows == [B] for e in experts)  # every expert on every row


def test_top1_runs_each_expert_only_on_its_routed_rows():
    x, t, experts = _setup()
    v = EnsembleVelocity(experts, toy_router, "top1")(x, t)
    choice = toy_router(x, t).argmax(-1)
    counts = torch.bincount(choice, minlength=K)
    assert (counts > 0).sum() >= 2, "the toy router must split the batch for this test to mean anything"
    for k, e in enumerate(experts):
        assert sum(e.rows) == int(counts[k])  # total rows over all experts == B: one forward per row
        assert len(e.rows) == (1 if counts[k] else 0)
    want = torch.stack([experts[int(c)].a * x[i] + experts[int(c)].b for i, c in enumerate(choice)])
    torch.testing.assert_close(v, want)


def test_top1_is_rerouted_at_every_step():
    x, _, experts = _setup()
    calls = []
    router = lambda x, t: (calls.append(float(t[0])), toy_router(x, t))[1]  # noqa: E731
    integrate(EnsembleVelocity(experts, router, "top1"), x, steps=4, solver="heun")
    assert len(calls) == 7  # Heun: 2 steps - 1 evaluations, each re-routed
    assert sum(sum(e.rows) for e in experts) == 7 * B


@pytest.mark.parametrize("strategy,kw,kept", [
    ("topk", dict(top_k=2), [[0.5, 0.3]]),
    ("threshold", dict(threshold=0.25), [[0.5, 0.3]]),
    ("nucleus", dict(nucleus_p=0.7), [[0.5, 0.3]]),
    ("nucleus", dict(nucleus_p=0.5), [[0.5]]),
    ("threshold", dict(threshold=0.9), [[0.5]]),  # the argmax is always kept
])
def test_sparse_strategies_renormalise_the_kept_experts(strategy, kw, kept):
    p = torch.tensor([[0.5, 0.2, 0.3]])
    w = expert_weights(p, strategy, **kw)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    nz = sorted(w[0][w[0] > 0].tolist(), reverse=True)
    want = torch.tensor(kept[0]) / sum(kept[0])
    torch.testing.assert_close(torch.tensor(nz), want)


def test_sample_strategy_draws_from_the_posterior():
    p = torch.tensor([[0.7, 0.1, 0.2]]).expand(20000, 3)
    w = expert_weights(p, "sample", generator=torch.Generator().manual_seed(0))
    freq = w.mean(0)
    assert torch.allclose(freq, p[0], atol=0.02)
    assert torch.equal(w.sum(-1), torch.ones(20000))


def test_missing_experts_are_renormalised_away():
    x, t, experts = _setup()
    experts[2] = None
    field = EnsembleVelocity(experts, toy_router, "full")
    v = field(x, t)
    logits = toy_router(x, t)[:, :2]
    p = logits.softmax(-1)
    want = sum(p[:, k].view(-1, 1, 1, 1) * (experts[k].a * x + experts[k].b) for k in range(2))
    torch.testing.assert_close(v, want)
    assert posterior(toy_router, x, t, field.present)[:, 2].eq(0).all()
    with pytest.raises(SamplerError, match="expert 2"):
        EnsembleVelocity(experts, toy_router, "single", fixed=torch.full((B,), 2))


def test_oracle_and_single_never_call_the_router():
    x, t, experts = _setup()
    router = lambda x, t: pytest.fail("router called")  # noqa: E731
    fixed = torch.tensor([0, 2] * (B // 2))
    v = EnsembleVelocity(experts, router, "oracle", fixed=fixed)(x, t)
    want = torch.stack([experts[int(k)].a * x[i] + experts[int(k)].b for i, k in enumerate(fixed)])
    torch.testing.assert_close(v, want)
    assert experts[1].rows == [] and experts[0].rows == [B // 2]


def test_cfg_is_applied_inside_each_expert_in_one_batched_call():
    calls = []

    def model(x, t, cond):
        calls.append(cond.clone())
        return x * 0 + (cond == 10).float().view(-1, 1, 1, 1) * 1.0 + cond.float().view(-1, 1, 1, 1) * 0.1

    x = torch.zeros(4, *SHAPE)
    cond = torch.tensor([1, 2, 3, 4])
    v = guided(model, 3.0, null_class=10)(x, torch.full((4,), 0.5), cond)
    v_cond, v_null = cond.float() * 0.1, torch.full((4,), 2.0)  # null: 1 + 10 * 0.1
    torch.testing.assert_close(v[:, 0, 0, 0], v_null + 3.0 * (v_cond - v_null))
    assert len(calls) == 1 and calls[0].tolist() == [1, 2, 3, 4, 10, 10, 10, 10]


def test_bad_strategy_and_arguments_are_one_line_errors():
    with pytest.raises(SamplerError, match='strategy = "best"'):
        EnsembleVelocity([], None, "best")
    with pytest.raises(SamplerError, match="nucleus_p"):
        EnsembleVelocity([], None, "nucleus", nucleus_p=0.0)
    with pytest.raises(SamplerError, match="needs the expert"):
        expert_weights(torch.ones(1, 2) / 2, "oracle")


def test_mixture_integrates_gaussian_flows_exactly():
    """Two point-mass experts at +-1: full ensemble with the exact posterior lands on the modes."""
    means = torch.tensor([-1.0, 1.0])

    def point_expert(m):  # exact flow of a point mass at m: v = (x - m) / t
        return lambda x, t, c: (x - m) / t.view(-1, 1, 1, 1).clamp_min(1e-3)

    def exact_router(x, t):  # p(k | x_t) for point masses: N(x; (1 - t) m_k, t^2)
        tt = t.view(-1, 1).clamp_min(1e-3)
        d = ((x.flatten(1)[:, :1] - (1 - tt) * means) ** 2)
        return -d / (2 * tt**2)

    noise = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    x0 = integrate(EnsembleVelocity([point_expert(-1.0), point_expert(1.0)], exact_router, "full"), noise, steps=50)
    assert torch.allclose(x0.abs(), torch.ones_like(x0), atol=0.05)
    assert 0.35 < (x0 > 0).float().mean() < 0.65


def _tiny_dits(K: int, classes: int = 10):
    from worker.models.dit import DiT

    torch.manual_seed(0)
    experts = [DiT(in_channels=1, input_size=(8, 8), patch_size=2, conditioning="class", num_classes=classes,
                   width=32, depth=2, heads=2).eval() for _ in range(K)]
    for e in experts:  # a fresh DiT outputs zeros, which would hide any mix-up of rows
        torch.nn.init.normal_(e.final.linear.weight, std=0.5)
    return experts


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["top1", "sample", "oracle"])
def test_sorted_dispatch_is_bit_identical_to_the_weighted_path(strategy):
    """The one-expert-per-row strategies dispatch by one sort per step; on CPU the output equals, bit for bit,
    the general path (every expert on its nonzero rows, index_add of weight 1), CFG and a missing expert included."""
    experts = [guided(e, 1.5, e.null_class) for e in _tiny_dits(4)]
    experts[2] = None  # a missing expert: the posterior gives it 0, so it is never chosen
    x, t = torch.randn(37, 1, 8, 8), torch.rand(37)
    cond = torch.arange(37) % 10
    router = lambda x, t: x.flatten(1)[:, :4] * 3  # noqa: E731 - splits the rows over the experts
    fixed = torch.tensor([0, 1, 3])[torch.arange(37) % 3] if strategy == "oracle" else None
    kwargs = dict(cond=cond, fixed=fixed)
    sorted_v = EnsembleVelocity(experts, router, strategy, generator=torch.Generator().manual_seed(3), **kwargs)(x, t)
    field = EnsembleVelocity(experts, router, strategy, generator=torch.Generator().manual_seed(3), **kwargs)
    weights = field.weights(x, t)
    assert (weights.sum(0) > 0).sum() >= 3, "rows must reach several experts for this test to mean anything"
    assert torch.equal(sorted_v, mixture_velocity(x, t, cond, experts, weights))


@torch.no_grad()
def test_bucketed_dispatch_pads_to_few_shapes_and_keeps_the_result():
    from worker.sampler import bucket_size, routed_velocity

    sizes = {bucket_size(n) for n in range(1, 257)}
    assert all(bucket_size(n) >= n and bucket_size(n) <= max(8, 1.25 * n) for n in range(1, 1025))
    assert len(sizes) <= 4 * 8 + 1  # about 4 shapes per octave
    seen: list[int] = []
    dits = _tiny_dits(3)

    def expert(k):
        def run(x, t, c):
            seen.append(x.shape[0])
            return dits[k](x, t, c)
        return run
    x, t, cond = torch.randn(29, 1, 8, 8), torch.rand(29), torch.arange(29) % 10
    chosen = torch.tensor([0] * 17 + [2] * 9 + [1] * 3)[torch.randperm(29, generator=torch.Generator().manual_seed(0))]
    exact = routed_velocity(x, t, cond, [expert(k) for k in range(3)], chosen, bucket=False)
    assert sorted(seen) == [3, 9, 17]
    seen.clear()
    padded = routed_velocity(x, t, cond, [expert(k) for k in range(3)], chosen, bucket=True)
    assert sorted(seen) == [8, 10, 20]
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-6)  # per-row results; only BLAS blocking differs

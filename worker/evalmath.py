"""Offline evaluation maths: Gaussian-mixture closed forms, sample distances, digit classifier, FID.

Gaussian mixture (builtin:gmm), in flattened latent coordinates x in R^D, components N(mu_k, s_k^2 I)
with weights pi_k. Under x_t = (1 - t) x0 + t eps, given component k:

    x_t | k ~ N((1 - t) mu_k, sigma_k(t)^2 I),   sigma_k(t)^2 = (1 - t)^2 s_k^2 + t^2
    p(k | x_t, t) = softmax_k(log pi_k + log N(x_t; (1 - t) mu_k, sigma_k(t)^2 I))      (router target)
    E[x0 | x_t, k] = mu_k + (1 - t) s_k^2 / sigma_k^2 (x_t - (1 - t) mu_k)
    E[v | x_t, k] = (x_t - E[x0 | x_t, k]) / t                                             (expert k)
    u(x_t) = sum_k p(k | x_t, t) E[v | x_t, k]                       (the marginal velocity, eq. 7)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GMM:
    weights: Tensor  # [K]
    means: Tensor    # [K, D]
    stds: Tensor     # [K]

    @classmethod
    def from_extra(cls, extra: dict) -> GMM:
        g = extra["gmm"]
        return cls(torch.tensor(g["weights"], dtype=torch.float64), torch.tensor(g["means"], dtype=torch.float64),
                   torch.tensor(g["stds"], dtype=torch.float64))

    def _gauss_logits(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """log pi_k + log N(x_t; (1-t) mu_k, sigma_k^2 I) [B, K], and sigma_k^2 [B, K]."""
        x, t = x.double().flatten(1), t.double().reshape(-1, 1)                       # [B, D], [B, 1]
        D = x.shape[1]
        var = (1 - t) ** 2 * self.stds[None] ** 2 + t**2                                # [B, K]
        sq = ((x[:, None, :] - (1 - t)[:, :, None] * self.means[None]) ** 2).sum(-1)    # [B, K]
        return self.weights.log()[None] - 0.5 * (D * torch.log(2 * math.pi * var) + sq / var), var

    def posterior(self, x: Tensor, t: Tensor) -> Tensor:
        """p(k | x_t, t) [B, K]."""
        return self._gauss_logits(x, t)[0].softmax(-1)

    def expert_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """E[v | x_t, k] [B, K, D]; written via E[eps | x_t, k] so it stays finite at t = 0."""
        x, t = x.double().flatten(1), t.double().reshape(-1, 1, 1)                     # [B, D], [B, 1, 1]
        var = (1 - t) ** 2 * self.stds[None, :, None] ** 2 + t**2                       # [B, K, 1]
        resid = x[:, None, :] - (1 - t) * self.means[None]                              # [B, K, D]
        x0 = self.means[None] + (1 - t) * self.stds[None, :, None] ** 2 / var * resid   # E[x0 | x_t, k]
        eps = t / var * resid                                                           # E[eps | x_t, k]
        return eps - x0

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact marginal velocity u(x_t) [B, D] (paper eq. 7 with the true posterior)."""
        return (self.posterior(x, t)[:, :, None] * self.expert_velocity(x, t)).sum(1)

    def routed_velocity(self, x: Tensor, t: Tensor, cluster_of_component: Tensor) -> Tensor:
        """Exact top-1 routing [B, D]: the velocity of the cluster with the largest p(k | x_t, t), where
        cluster k's exact velocity mixes its own components, sum_{c in k} p(c | x_t, k) E[v | x_t, c]."""
        p = self.posterior(x, t)                                                        # [B, C]
        K = int(cluster_of_component.max()) + 1
        p_cluster = torch.zeros(p.shape[0], K, dtype=p.dtype).index_add_(1, cluster_of_component, p)
        chosen = (cluster_of_component[None] == p_cluster.argmax(1)[:, None]).to(p.dtype)  # [B, C]
        within = p * chosen / (p * chosen).sum(1, keepdim=True)
        return (within[:, :, None] * self.expert_velocity(x, t)).sum(1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) [B] under the data mixture (t = 0)."""
        return self._gauss_logits(x, torch.zeros(x.shape[0]))[0].logsumexp(-1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise, k


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: W2 of 1-D projections on random directions, averaged."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0, 1, max(a.shape[0], b.shape[0]), dtype=torch.float64)
    pa, pb = torch.quantile(a @ dirs, q, dim=0), torch.quantile(b @ dirs, q, dim=0)  # [Q, P]
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: Tensor, b: Tensor) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels at 0.5, 1, 2 x the median pairwise distance."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z) ** 2
    med = d2[d2 > 0].median()
    k = sum(torch.exp(-d2 / (s * med)) for s in (0.25, 1.0, 4.0))
    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    mmd2 = (kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1)) - 2 * kab.mean()
    return float(mmd2)


def mode_coverage(x: Tensor, gmm: GMM, min_share: float = 0.5) -> tuple[float, list[float]]:
    """Fraction of components holding at least min_share x pi_k of the samples (nearest by posterior)."""
    k = gmm.posterior(x, torch.zeros(x.shape[0])).argmax(-1)
    share = torch.bincount(k, minlength=len(gmm.weights)).double() / x.shape[0]
    covered = (share >= min_share * gmm.weights).double().mean()
    return float(covered), [round(float(s), 4) for s in share]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a singular product is handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        off = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


# ---- intervals and the Fréchet reference ------------------------------------------------------------
def mean_interval(values: list[float], level: float = 0.95) -> dict[str, float | list[float] | None]:
    """Mean and Student-t interval over independent repeats (sampling seeds): mean +- t_{(1+level)/2, S-1}
    s / sqrt(S). With one repeat the half-width is None (no interval from a single seed)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "ci95": None, "values": v.tolist()}
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "ci95": half, "values": v.tolist()}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: unlike p +- z sqrt(p(1-p)/n), it keeps a width when
    every trial (or none) succeeds, e.g. 384 of 384 gives [0.990, 1]."""
    p, zz = successes / trials, z * z / trials
    centre = (p + zz / 2) / (1 + zz)
    half = z * np.sqrt(p * (1 - p) / trials + zz / (4 * trials)) / (1 + zz)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def reference_frechet(pool: np.ndarray, target: np.ndarray, n: int, draws: int = 20,
                      seed: int = 0) -> dict[str, float | int]:
    """Fréchet distance a perfect generator would score: `draws` random sets of n real rows from `pool`
    (never the target rows) against the same `target`, as a generated set of n samples is compared.
    Rows are drawn without replacement when the pool is large enough (bootstrap, with, otherwise);
    returns the mean and the 2.5 / 97.5 percentiles of the draws."""
    rng = np.random.default_rng(seed)
    replace = n > len(pool)
    fds = [frechet_distance(pool[rng.choice(len(pool), n, replace=replace)], target) for _ in range(draws)]
    lo, hi = np.percentile(fds, [2.5, 97.5])
    return {"mean": float(np.mean(fds)), "p2.5": float(lo), "p97.5": float(hi), "draws": draws, "n": n,
            "with_replacement": replace}


# ---- digits classifier --------------------------------------------------------------------------------
def digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as [N, 1, 8, 8] in [-1, 1] (0..16 ink levels) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    return x, torch.tensor(d.target, dtype=torch.long)


class DigitClassifier(torch.nn.Module):
    """A small MLP; its last hidden layer is the feature space of the Fréchet distance."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, features), torch.nn.ReLU())
        self.head = torch.nn.Linear(features, 10)

    def features(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (8, 8):  # the digits are 8x8 scans: a larger run is judged area-averaged back
            x = torch.nn.functional.adaptive_avg_pool2d(x.float(), 8)
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(seed: int = 0, epochs: int = 300,
                           data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[DigitClassifier, float]:
    """Train (full batch, Adam) on `data` = (x_train, y_train, x_test, y_test), by default 80% / 20% of
    the bundled digits; returns the model and its accuracy on the test rows."""
    g = torch.Generator().manual_seed(seed)
    if data is None:
        x, y = digits_data()
        order = torch.randperm(len(x), generator=g)
        cut = int(0.8 * len(x))
        data = (x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():  # callers (report, eval) may sample under no_grad around this
        for _ in range(epochs):
            noisy = x_tr + 0.05 * torch.randn(x_tr.shape, generator=g)  # mild noise: samples are never exact
            loss = torch.nn.functional.cross_entropy(model(noisy), y_tr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    accuracy = float((model(x_te).argmax(-1) == y_te).float().mean())
    return model, accuracy


# ---- FID (only with local Inception weights) ----------------------------------------------------------
def inception_features(model: torch.nn.Module, images: Tensor, batch: int = 64) -> np.ndarray:
    """2048-d pool features of images [N, C, H, W] in [0, 1] (worker/models/inception.py), quantised to
    8 bits first as FID's reference images are."""
    out = []
    for chunk in images.split(batch):
        chunk = (chunk.float().clamp(0, 1) * 255).round() / 255
        if chunk.shape[1] == 1:
            chunk = chunk.repeat(1, 3, 1, 1)
        with torch.no_grad():
            out.append(model(chunk).double().numpy())
    return np.concatenate(out)

"""Flow matching with the interpolant of docs/design.md §2: x_t = (1 - t) x0 + t eps, v = eps - x0, t = 1 is noise.

Decentralized Flow Matching (paper eq. 4-7) needs nothing special here: each expert minimises the
ordinary loss below on its own cluster only; the router supplies p(k | x_t, t) at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t [B] broadcast over the sample dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)                    # [B, 1, 1, 1]
    return (1 - t) * x0 + t * eps                                            # [B, C, H, W]


def sample_t(n: int, scheme: Literal["uniform", "logit_normal"], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times: uniform on [0, 1], or logit-normal (sigmoid of N(0, 1); SD3, Esser et al. 2024),
    which spends more of the budget at intermediate t where the velocity is hardest to predict."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    raise ValueError(f"timestep_sampling = {scheme!r}: expected 'uniform' or 'logit_normal'")


def drop_condition(cond: torch.Tensor | None, drop: torch.Tensor, null_class: int | None) -> torch.Tensor | None:
    """Label dropout for classifier-free guidance: rows where `drop` is True get the null condition
    (the null class index, or all-zero text). Unlabelled rows (label -1) always get the null class."""
    if cond is None:
        return None
    if cond.dtype == torch.long:
        return torch.where(drop | (cond < 0), torch.full_like(cond, null_class), cond)  # [B]
    keep = (~drop).to(cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
    return cond * keep                                                       # [B, L, D]


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                       cond: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss || v_theta(x_t, t) - (eps - x0) ||^2 averaged over dims (paper eq. 3 / eq. 6)."""
    x_t = interpolate(x0, eps, t)                                            # [B, C, H, W]
    v = model(x_t, t, cond)                                                  # [B, C, H, W]
    return (v.float() - (eps - x0).float()).square().flatten(1).mean(dim=1)  # [B]


def cfg_velocity(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                 null_cond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v(null) + scale (v(cond) - v(null)), both halves in one batch."""
    if cond is None or scale == 1.0:
        return model(x, t, cond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))  # [2B, C, H, W]
    v_cond, v_null = v.chunk(2)
    return v_null + scale * (v_cond - v_null)


@torch.no_grad()
def sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
           solver: Literal["euler", "heun"] = "euler") -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) on a uniform grid; returns x0.
    Heun (2nd order) corrects every step but the last, as in EDM, so it costs 2 steps - 1 evaluations."""
    if steps < 1:
        raise ValueError(f"steps = {steps}: need at least 1")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver = {solver!r}: expected 'euler' or 'heun'")
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for i in range(steps):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        dt = ts[i + 1] - ts[i]                                               # negative
        v = velocity_fn(x, t)                                                # [B, C, H, W]
        x_next = x + dt * v
        if solver == "heun" and i < steps - 1:
            x_next = x + dt * 0.5 * (v + velocity_fn(x_next, t_next))
        x = x_next
    return x

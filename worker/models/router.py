"""The router of paper Algorithm 1: a DiT encoder with a learned CLS token and a linear head over K clusters.

It estimates p(k | x_t, t) (or p(k | x_t, t, c) with model.conditioning = class), the weight of expert k in the marginal velocity
u_t(x_t) = sum_k p(k | x_t, t) v_k(x_t) (paper eq. 5-7), and is trained with cross-entropy on the
cluster label of samples noised by the same interpolant the experts use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from common.config import ConfigError, ModelConfig, ModelLimits
from worker.flow import interpolate
from worker.models.dit import DiTTrunk, dit_forward_flops, resolve_size

# t-buckets of the router metrics; the last one is where sampling starts (t = 1, then 1 - 1/steps, ...).
T_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)


class Router(ModelMixin, ConfigMixin):
    """Logits over K experts for any [B, C, H, W] whose sides are multiples of `patch_size`: the trunk's
    sin-cos positions follow the input's token grid and the CLS token carries no position."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 4, input_size: tuple[int, int] = (32, 32), patch_size: int = 2,
                 width: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, num_experts: int = 2,
                 conditioning: str = "none", num_classes: int | None = None, text_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or not 1 <= num_experts <= ModelLimits.num_experts:
            raise ConfigError(f"num_experts = {num_experts!r}: must be an integer in [1, {ModelLimits.num_experts:,}]")
        self.trunk = DiTTrunk(in_channels, tuple(input_size), patch_size, width, depth, heads, mlp_ratio,
                              conditioning, num_classes, text_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_experts)
        self.trunk.init_weights()
        nn.init.normal_(self.cls, std=0.02)
        nn.init.zeros_(self.head.weight)  # starts at the uniform posterior 1/K
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c, _ = self.trunk.embed(x, t, cond)                           # [B, T, D], [B, D]
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # [B, 1 + T, D]
        tokens = self.trunk(tokens, c)                                        # [B, 1 + T, D]
        return self.head(self.norm(tokens[:, 0]))                             # [B, K] logits

    def flops_per_image(self, input_size: tuple[int, int] | None = None) -> float:
        cfg = self.config
        return dit_forward_flops(cfg.width, cfg.depth, input_size or cfg.input_size, cfg.patch_size, cfg.in_channels,
                                 cfg.mlp_ratio)


def build_router(model: ModelConfig, latent_shape: list[int], num_experts: int, num_classes: int | None,
                 text_dim: int | None) -> Router:
    C, H, W = latent_shape
    return Router(in_channels=C, input_size=(H, W), patch_size=model.patch_size, num_experts=num_experts,
                  conditioning=model.conditioning, num_classes=num_classes if model.conditioning == "class" else None,
                  text_dim=text_dim if model.conditioning == "text" else None, **resolve_size(model))


def router_loss(model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cluster: torch.Tensor,
                cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paper Algorithm 1: cross-entropy of the cluster of x0 given its noised x_t. Returns the
    per-sample loss [B] and detached per-sample stats for the accuracy/calibration metrics."""
    logits = model(interpolate(x0, eps, t), t, cond).float()                 # [B, K]
    loss = F.cross_entropy(logits, cluster, reduction="none")                # [B]
    conf, pred = logits.detach().softmax(-1).max(-1)                         # [B], [B]
    return loss, {"t": t.detach(), "correct": (pred == cluster).float(), "conf": conf}


def bucket_of(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Mask of t in [lo, hi), the last bucket closed at 1."""
    return (t >= lo) & ((t < hi) if hi < 1 else (t <= hi))


def expected_calibration_error(correct: torch.Tensor, conf: torch.Tensor, bins: int = 10) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - mean confidence|, weighted by share."""
    which = (conf * bins).clamp(max=bins - 1).long()                         # [N]
    ece = torch.zeros(())
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.float().mean() * (correct[mask].float().mean() - conf[mask].float().mean()).abs()
    return ece.item()


def calibration_metrics(t: torch.Tensor, correct: torch.Tensor, conf: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Accuracy per t-bucket and expected calibration error over `bins` confidence bins."""
    out: dict[str, float] = {}
    for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:]):
        mask = bucket_of(t, lo, hi)
        if mask.any():
            out[f"acc_t{lo:.2f}-{hi:.2f}"] = correct[mask].mean().item()
    out["ece"] = expected_calibration_error(correct, conf, bins)
    out["accuracy"] = correct.mean().item()
    return out

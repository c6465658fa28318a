"""The training compute a config buys, derived before anything runs (`ddm config show`).

Experts share one budget, `training.total_nimg`, split evenly over K (unless the per-expert override
`training.duration_nimg` is set), and the global batch is split over K too, so K = 1 and K = 8 train on
the same number of images with the same FLOPs per image: FLOP matching by construction (paper §4.1).
Training FLOPs are estimated as 3 x forward FLOPs per image x images (forward + backward), the same
estimate the training loop's MFU uses. Images and tokens are both reported: with aspect-ratio buckets
(data.buckets) an image's tokens, (H / p) x (W / p), depend on its bucket, so with an image budget the FLOPs
lie between those of the bucket with the fewest tokens and the one with the most (where in that range
depends on the rows per bucket, known after prepare: `ddm status`). `training.budget_unit = tokens` matches
tokens instead: each job trains until it has seen the tokens of its images at the data.image_size square.
"""

from __future__ import annotations

import math
from typing import Any

from common.config import ModelConfig, RunConfig
from worker.models.dit import dit_forward_flops, resolve_size

VAE_CHANNELS, VAE_DOWNSAMPLE = 4, 8  # sd-vae-ft-mse; the real shape is read from the VAE at prepare time


def latent_shape(config: RunConfig) -> list[int]:
    """[C, H, W] the models will see: pixels for the identity encoder, else the usual VAE latents."""
    size = config.data.image_size
    if config.latents.encoder == "identity":
        return [config.data.channels, size, size]
    return [VAE_CHANNELS, size // VAE_DOWNSAMPLE, size // VAE_DOWNSAMPLE]


def forward_flops(model: ModelConfig, shape: list[int]) -> float:
    dims = resolve_size(model)
    return dit_forward_flops(dims["width"], dims["depth"], tuple(shape[1:]), model.patch_size, shape[0])


def tokens(shape: list[int], patch: int) -> int:
    """Tokens of one image: (H / p) x (W / p) latent patches."""
    return (shape[1] // patch) * (shape[2] // patch)


def bucket_costs(config: RunConfig) -> list[dict[str, Any]]:
    """Per bucket (data.buckets.enabled): pixels, latent shape, expert tokens and expert training FLOPs per image."""
    if not config.data.buckets.enabled:
        return []
    factor = 1 if config.latents.encoder == "identity" else VAE_DOWNSAMPLE
    channels = latent_shape(config)[0]
    out = []
    for w, h in config.bucket_sizes(factor):
        shape = [channels, h // factor, w // factor]
        out.append({"bucket": [w, h], "latent_shape": shape, "tokens": tokens(shape, config.model.patch_size),
                    "train_flops_per_image": 3 * forward_flops(config.model, shape)})
    return out


def training_budget(config: RunConfig) -> dict[str, Any]:
    """Per-expert and total images and tokens, optimizer steps and estimated training FLOPs (experts, router)."""
    k, shape = config.clustering.num_experts, latent_shape(config)
    per_expert, batch = config.expert_nimg, config.expert_batch
    expert_flops = 3 * forward_flops(config.model, shape)
    router_batch = config.router.training.global_batch
    router_flops = 3 * forward_flops(config.router.model, shape)
    buckets = bucket_costs(config)
    return {
        "tokens_per_image": tokens(shape, config.model.patch_size),
        "experts_total_tokens": tokens(shape, config.model.patch_size) * per_expert * k,
        "buckets": buckets,
        "rule": ("training.duration_nimg (per-expert override)" if config.training.duration_nimg is not None
                 else "training.total_nimg split over K"),
        "num_experts": k, "latent_shape": shape, "budget_unit": config.training.budget_unit,
        "per_expert_nimg": per_expert, "per_expert_batch": batch, "per_expert_steps": math.ceil(per_expert / batch),
        "experts_total_nimg": per_expert * k, "experts_train_flops": expert_flops * per_expert * k,
        "router_nimg": config.router_nimg, "router_batch": router_batch,
        "router_steps": math.ceil(config.router_nimg / router_batch),
        "router_train_flops": router_flops * config.router_nimg,
    }


def format_budget(b: dict[str, Any], heading: str = "budget") -> str:
    """YAML comment lines, so `ddm config show` output stays a loadable config."""
    shape = "x".join(map(str, b["latent_shape"]))
    return "\n".join([
        f"# {heading} ({b['rule']}; latents {shape}; FLOPs = 3 x forward x images):",
        f"#   per expert: {b['per_expert_nimg']:,} images = {b['per_expert_steps']:,} steps of batch {b['per_expert_batch']}"
        if b["budget_unit"] == "images" else
        f"#   per expert: {b['per_expert_nimg'] * b['tokens_per_image']:,} tokens (budget_unit = tokens: the tokens of "
        f"{b['per_expert_nimg']:,} images at {shape}; each expert's images follow from its buckets' tokens)",
        f"#   experts total (K = {b['num_experts']}): {b['experts_total_nimg']:,} images, "
        f"{b['experts_train_flops']:.3e} training FLOPs",
        f"#   router: {b['router_nimg']:,} images = {b['router_steps']:,} steps of batch {b['router_batch']}, "
        f"{b['router_train_flops']:.3e} training FLOPs",
        f"#   tokens: {b['tokens_per_image']:,} per image at {shape}, experts total {b['experts_total_tokens']:,}",
    ] + _bucket_lines(b)) + "\n"


def _bucket_lines(b: dict[str, Any]) -> list[str]:
    if not b["buckets"]:
        return []
    images = b["experts_total_nimg"]
    lo = min(b["buckets"], key=lambda c: c["tokens"])
    hi = max(b["buckets"], key=lambda c: c["tokens"])
    if b["budget_unit"] == "tokens":
        total = b["experts_total_tokens"]
        return [f"#   aspect-ratio buckets ({len(b['buckets'])}): {lo['tokens']:,} to {hi['tokens']:,} tokens per image; "
                f"experts total {total:,} tokens whatever the buckets, that is {total // hi['tokens']:,} to "
                f"{total // lo['tokens']:,} images (where in the range: rows per bucket, `ddm status` after prepare)"]
    return [f"#   aspect-ratio buckets ({len(b['buckets'])}): {lo['tokens']:,} to {hi['tokens']:,} tokens per image; "
            f"experts total {lo['tokens'] * images:,} to {hi['tokens'] * images:,} tokens, "
            f"{lo['train_flops_per_image'] * images:.3e} to {hi['train_flops_per_image'] * images:.3e} training FLOPs "
            f"(where in the range: rows per bucket, `ddm status` after prepare)"]

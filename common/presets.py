"""Named presets: plain functions returning a validated `RunConfig` (torchtitan style)."""

from __future__ import annotations

from collections.abc import Callable

from common.buckets import BucketConfig
from common.config import (
    ClusteringConfig,
    DataConfig,
    FeaturesConfig,
    HiresConfig,
    IslandConfig,
    IslandsConfig,
    LatentsConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    SamplingConfig,
    TextConfig,
    TrainingConfig,
)


def _two_local_islands() -> IslandsConfig:
    """Two simulated islands on one machine: the same scheduling path as a real cluster."""
    return IslandsConfig(pool=[
        IslandConfig(name="island-a", resources={"island-a": 1.0}, cpus_per_worker=1.0),
        IslandConfig(name="island-b", resources={"island-b": 1.0}, cpus_per_worker=1.0),
    ])


def digits() -> RunConfig:
    """Embedded demo: scikit-learn's 1,797 real 8x8 digits, pixel space, class-conditional, K = 4."""
    return RunConfig(
        name="digits",
        run_uri="runs/digits",
        # A fifth of the digits is held out: ddm eval measures Fréchet distance and accuracy against it.
        data=DataConfig(source="builtin:digits", image_size=8, channels=1, label_source="builtin", num_classes=10,
                        holdout_fraction=0.2),
        features=FeaturesConfig(extractor="pixels", pixels_size=8),
        latents=LatentsConfig(encoder="identity"),
        clustering=ClusteringConfig(num_experts=4, num_fine_centroids=256, metric="cosine"),
        model=ModelConfig(size="tiny", patch_size=2, conditioning="class", label_dropout=0.1),
        # 48,000 images per expert at K = 4; --set clustering.num_experts=1 is the FLOP-matched monolith.
        # Sized for the demo's 3-minute target on 2 cores (BENCHMARKS.md, demo); 4 x 96,000 lowers the
        # held-out Fréchet distance from 13.9 ± 1.7 to 10.2 ± 1.9 at the same class accuracy (0.99).
        training=TrainingConfig(global_batch=256, total_nimg=4 * 48_000, lr=1e-3, ema_decay=0.999,
                                checkpoint_every_nimg=16_000, log_every_nimg=3_200),
        # A router well below expert size, as in the paper (DiT-B/2 router for DiT-XL/2 experts): with CFG an
        # expert step is two forwards, so top-1 costs ~1.06x one expert (BENCHMARKS.md, top-1 cost).
        router=RouterConfig(model=ModelConfig(size="tiny", width=32, depth=2, heads=2, patch_size=2,
                                              conditioning="none", label_dropout=0.0),
                            training=TrainingConfig(global_batch=64, total_nimg=32_000, lr=1e-3, ema_decay=0.999,
                                                    timestep_sampling="uniform", checkpoint_every_nimg=16_000,
                                                    log_every_nimg=3_200)),
        islands=_two_local_islands(),
        sampling=SamplingConfig(steps=32, cfg_scale=2.0),
    )


def gmm() -> RunConfig:
    """Gaussian mixture with known density: router posterior and ensemble velocity have closed forms."""
    return RunConfig(
        name="gmm",
        run_uri="runs/gmm",
        data=DataConfig(source="builtin:gmm", image_size=2, channels=1, label_source="builtin",
                        gmm_components=4, gmm_items=8192, gmm_separation=4.0),
        features=FeaturesConfig(extractor="pixels", pixels_size=2),
        latents=LatentsConfig(encoder="identity"),
        clustering=ClusteringConfig(num_experts=4, num_fine_centroids=64, metric="euclidean"),
        model=ModelConfig(size="tiny", patch_size=1, conditioning="none", label_dropout=0.0),
        training=TrainingConfig(global_batch=256, total_nimg=4 * 64_000, lr=1e-3, ema_decay=0.999,
                                timestep_sampling="uniform", checkpoint_every_nimg=16_000),
        router=RouterConfig(model=ModelConfig(size="tiny", patch_size=1, conditioning="none", label_dropout=0.0),
                            training=TrainingConfig(global_batch=128, total_nimg=64_000, lr=1e-3, ema_decay=0.999,
                                                    timestep_sampling="uniform", checkpoint_every_nimg=16_000)),
        islands=_two_local_islands(),
        eval=dict(strategies=["top1", "topk", "full", "sample", "oracle"]),  # type: ignore[arg-type]
    )


def shapes() -> RunConfig:
    """Procedural captioned shapes (16x16 RGB): exercises captions, text conditioning and clustering."""
    return RunConfig(
        name="shapes",
        run_uri="runs/shapes",
        data=DataConfig(source="builtin:shapes", image_size=16, channels=3, label_source="builtin",
                        captions=True, gmm_items=2048),
        features=FeaturesConfig(extractor="pixels", pixels_size=8, pca_dim=32),
        latents=LatentsConfig(encoder="identity"),
        clustering=ClusteringConfig(num_experts=4, num_fine_centroids=128),
        model=ModelConfig(size="tiny", patch_size=4, conditioning="class"),
        training=TrainingConfig(global_batch=128, total_nimg=4 * 64_000, lr=1e-3, ema_decay=0.999),
        islands=_two_local_islands(),
    )


def _paper(name: str, source: str, batch: int, conditioning: str) -> RunConfig:
    """The paper's settings (§4.1): DINOv2 features, sd-vae-ft-mse latents, DiT-XL/2 experts, K = 8."""
    return RunConfig(
        name=name,
        run_uri=f"s3://ddm-runs/{name}",
        data=DataConfig(source=source, image_size=256, channels=3,
                        label_source="folder" if conditioning == "class" else "none",
                        captions=conditioning == "text", num_classes=1000 if conditioning == "class" else None),
        features=FeaturesConfig(extractor="dinov2", model="facebook/dinov2-large", batch_size=256),
        latents=LatentsConfig(encoder="vae", model="stabilityai/sd-vae-ft-mse", batch_size=128),
        text=TextConfig(encoder="clip" if conditioning == "text" else "none", model="openai/clip-vit-large-patch14"),
        clustering=ClusteringConfig(num_experts=8, num_fine_centroids=1024, fit_sample=50_000),
        model=ModelConfig(size="XL", patch_size=2, conditioning=conditioning),  # type: ignore[arg-type]
        # compile "auto": torch.compile on CUDA (what benchmarks/train_throughput.py --suite h200 measures),
        # eager elsewhere; fp32 matmuls use TF32 (training.tf32, on by default).
        training=TrainingConfig(global_batch=batch, total_nimg=batch * 800_000, lr=1e-4, ema_decay=0.9999,
                                ema_warmup=False, checkpoint_every_nimg=1_000_000, log_every_nimg=51_200,
                                compile="auto"),
        router=RouterConfig(model=ModelConfig(size="B", patch_size=2, conditioning="none", label_dropout=0.0),
                            training=TrainingConfig(global_batch=256, total_nimg=256 * 200_000, lr=1e-4,
                                                    timestep_sampling="uniform", compile="auto")),
        islands=IslandsConfig(pool=[
            # One expert per GPU, eight at once: an XL/2 expert's batch of 32 fits one H100, and packing
            # avoids DDP's per-step all-reduce of the fp32 gradients (set num_workers > 1 to opt in).
            IslandConfig(name="h100x8", resources={"island-h100x8": 1.0}, num_workers=1, use_gpu=True,
                         accelerator_type="H100", cpus_per_worker=8, speed=1.0, concurrency=8),
            IslandConfig(name="a10g", resources={"island-a10g": 1.0}, num_workers=1, use_gpu=True,
                         accelerator_type="A10G", cpus_per_worker=8, per_worker_batch=16, speed=0.25, concurrency=4),
        ], simulate=False),
        sampling=SamplingConfig(steps=250, cfg_scale=1.5 if conditioning == "class" else 4.0, solver="heun"),
    )


def imagenet_xl2() -> RunConfig:
    return _paper("imagenet-xl2", "s3://datasets/imagenet/train", 256, "class")


def laion_xl2() -> RunConfig:
    """Captioned web photos in every aspect ratio: aspect-ratio buckets of about 256^2 pixels (sides multiples
    of the VAE factor 8 x patch 2), and budgets that match tokens rather than images between experts."""
    config = _paper("laion-xl2", "s3://datasets/laion-aesthetic/shards/", 1024, "text")
    config.data.buckets = BucketConfig(enabled=True, max_aspect=2.0)
    config.training.budget_unit = "tokens"
    config.router.training.budget_unit = "tokens"
    # Then a continuation at about 512^2 pixels (the buckets regenerated at that area), from the base exports.
    config.hires = HiresConfig(image_size=512, total_nimg=1024 * 100_000, router_nimg=256 * 20_000)
    return config


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "digits": digits,
    "gmm": gmm,
    "shapes": shapes,
    "imagenet-xl2": imagenet_xl2,
    "laion-xl2": laion_xl2,
}

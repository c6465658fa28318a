"""Typed run configuration: one pydantic model per component, composed into `RunConfig`.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
The config is resolved once on the driver (preset -> YAML file -> `--set` overrides), validated,
fingerprinted and written to `run.json`; components receive only their own section.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.buckets import Bucket, BucketConfig
from common.errors import UsageError

# Known sizes of the built-in sources, so that cross-field checks can run before any data is read
# (builtin:gmm and builtin:shapes generate data.gmm_items rows; see `known_dataset_size`).
BUILTIN_SIZES = {"builtin:digits": 1797}

# The inference strategies of paper Table 1 (worker/sampler.py implements them): the one list of names.
Strategy = Literal["top1", "topk", "full", "sample", "threshold", "nucleus", "oracle", "single"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# DiT size presets (Peebles & Xie 2023, Table 1; "tiny" for CPU tests). worker/models/dit.py builds them.
ModelSize = Literal["tiny", "S", "B", "L", "XL"]
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=4, heads=4),
    "S": dict(width=384, depth=12, heads=6),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "XL": dict(width=1152, depth=28, heads=16),
}
assert tuple(MODEL_SIZES) == get_args(ModelSize)


class ModelLimits:
    """Explicit bounds on every model size, checked in the config and again before a model stored in a
    run (its config.json) allocates anything: an untrusted file must not be able to ask for 10^12 floats.
    They sit well above the paper's largest model (DiT-XL/2: width 1152, depth 28, 675M parameters)."""
    width = 8192
    depth = 256
    heads = 256
    patch_size = 64
    input_side = 4096          # latent height / width in cells
    in_channels = 256
    tokens = 65_536            # (H / p) * (W / p): the positional table and attention length
    num_classes = 1_000_000
    text_dim = 16_384
    mlp_ratio = 16.0
    num_experts = 4096
    parameters = 20_000_000_000


class Strict(BaseModel):
    # allow_inf_nan=False: every float in the config must be finite (an infinite lr or cfg_scale is an error).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class DataConfig(Strict):
    source: str = Field("builtin:digits", description="Local path or fsspec URL of an image folder or tar shards, or builtin:digits|shapes|gmm.")
    image_size: int = Field(8, ge=1, le=ModelLimits.input_side,
                            description="Images are resized (shorter side) and centre-cropped to this square size, in pixels.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB; every decoded image is converted to this.")
    max_items: int | None = Field(None, ge=1, description="Use at most this many items (in discovery order); None = all.")
    label_source: Literal["none", "folder", "file", "builtin"] = Field("builtin", description="Where class labels come from.")
    labels_file: str | None = Field(None, description="labels.jsonl or labels.csv (key,label) relative to the source, for label_source=file.")
    captions: bool = Field(False, description="Read captions (sibling .txt, or .txt/.json in tar shards).")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Seeded fraction of rows held out for evaluation (data/holdout/): no expert, router or clustering fit "
        "sees them; ddm eval measures against them."))
    duplicate_policy: Literal["keep", "quarantine"] = Field("quarantine", description="What to do with byte-identical content seen before.")
    max_image_pixels: int = Field(64_000_000, ge=1, description="Decompression-bomb limit: images with more pixels are quarantined.")
    max_file_bytes: int = Field(64 * 2**20, ge=1, description="Files larger than this are quarantined unread.")
    shard_rows: int = Field(4096, ge=1, description="Rows per latent/feature shard.")
    num_classes: int | None = Field(None, ge=1, le=ModelLimits.num_classes,
                                    description="Number of classes for class conditioning; None = inferred from the data.")
    gmm_components: int = Field(4, ge=1, description="builtin:gmm: number of mixture components.")
    gmm_items: int = Field(8192, ge=1, description="builtin:gmm / builtin:shapes: number of items generated.")
    gmm_separation: float = Field(4.0, gt=0, description="builtin:gmm: distance scale between component means, in component std units.")
    shapes_aspect_ratios: list[Annotated[float, Field(ge=1 / 16, le=16)]] | None = Field(
        None, min_length=1, max_length=64, description=(
            "builtin:shapes: draw each image at a width / height ratio drawn (seeded) from this list, with about "
            "data.image_size^2 pixels; each is then centre-cropped to the square like a file, or kept at its own "
            "size for prepare to bucket when data.buckets.enabled. None = square images."))
    shapes_placement: Literal["centre", "anywhere", "frame"] = Field("centre", description=(
        "builtin:shapes: where a shape is drawn: centred in the middle 30% of each side; anywhere the whole "
        "shape fits, so it reaches the ends of wide and tall images (which a centre crop to the square cuts off); "
        "or frame: stretched over 75-95% of the image's width and height, like a subject that fills a photograph, "
        "so a centre crop of a wide or tall image loses the figure's ends (a wide ellipse's middle is a band)."))
    buckets: BucketConfig = Field(default_factory=BucketConfig, description=(
        "Aspect-ratio buckets (common/buckets.py); off by default."))


class FeaturesConfig(Strict):
    """Features used only for clustering (paper §4.1 uses pooled DINOv2)."""
    extractor: Literal["pixels", "dinov2"] = "pixels"
    model: str | None = Field(None, description="Hugging Face id or local directory for dinov2.")
    pixels_size: int = Field(8, ge=1, description="pixels extractor: downsample to this square size before flattening.")
    pca_dim: int | None = Field(None, ge=1, description="pixels extractor: PCA-project to this many dims (None = no PCA).")
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LatentsConfig(Strict):
    encoder: Literal["identity", "vae"] = "identity"
    model: str | None = Field(None, description="Hugging Face id or local directory of a diffusers AutoencoderKL.")
    subfolder: str | None = Field(None, description="Subfolder inside `model` holding the VAE (e.g. 'vae').")
    batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="VAE weights and activations; fp16 is not offered (the SD VAE overflows in fp16).")
    store_dtype: Literal["bf16", "fp32"] = Field("bf16", description="Stored latent dtype: bf16 halves storage, transfer and training-window memory; training computes in fp32.")


class TextConfig(Strict):
    encoder: Literal["none", "clip"] = "none"
    model: str | None = Field(None, description="Hugging Face id or local directory of a CLIP text model + tokenizer.")
    max_length: int = Field(77, ge=1)


class PrepareConfig(Strict):
    num_workers: int = Field(2, ge=1, description="Encoder actors (each builds its encoders once); capped by the cluster's CPUs, and by its GPUs with use_gpu.")
    use_gpu: bool = Field(False, description="Give each encoder actor one GPU.")
    encoder_cpus: float = Field(0.5, gt=0, description="CPUs reserved per encoder actor (a scheduling share: with a GPU it mostly waits on the device).")
    decode_cpus: float = Field(0.5, gt=0, description=(
        "CPUs per read + decode task of the Ray Data pipeline: a scheduling share. A task also waits on reads (object "
        "storage above all) and the encoder actors rarely use their whole share on CPU-cheap encoders, so two tasks "
        "per CPU keep the cores busy (on 2 cores: 0.99x a single-process PIL loop in steady state, against 0.58x at 1.0)."))


class ClusteringConfig(Strict):
    method: Literal["kmeans2", "random"] = Field("kmeans2", description="kmeans2 = two-stage k-means (fine -> coarse); random = ablation baseline.")
    num_experts: int = Field(4, ge=1, le=ModelLimits.num_experts,
                             description="K, the number of clusters = experts. K = 1 is the monolith baseline.")
    num_fine_centroids: int = Field(1024, ge=1, description="Stage-one centroids; clipped to the number of items.")
    fit_sample: int = Field(50_000, ge=1, description="Items sampled to fit the fine centroids.")
    iterations: int = Field(20, ge=1)
    metric: Literal["cosine", "euclidean"] = "cosine"
    balanced: bool = Field(False, description="Cap cluster sizes at max_cluster_fraction by reassigning overflow to the next-nearest centroid.")
    max_cluster_fraction: float = Field(0.5, gt=0, le=1)
    assign_chunk_rows: int = Field(65_536, ge=1, description="Rows per assignment chunk: bounds memory, not the dataset.")
    parallel_min_rows: int = Field(262_144, ge=1, description="From this many rows, assignment runs shard by shard as Ray tasks when Ray is up (not with balanced, whose cap is sequential).")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ModelConfig(Strict):
    """A DiT (worker/models/dit.py). in_channels and input size come from the latents."""
    size: ModelSize = Field("tiny", description="Preset in MODEL_SIZES: tiny, S, B, L, XL.")
    patch_size: int = Field(2, ge=1, le=ModelLimits.patch_size)
    width: int | None = Field(None, ge=8, le=ModelLimits.width, description="Override the preset's hidden size.")
    depth: int | None = Field(None, ge=1, le=ModelLimits.depth, description="Override the preset's number of blocks.")
    heads: int | None = Field(None, ge=1, le=ModelLimits.heads, description="Override the preset's attention heads.")
    conditioning: Literal["none", "class", "text"] = "class"
    label_dropout: float = Field(0.1, ge=0, le=1, description="Probability of replacing the condition by the null condition (CFG training).")

    def dims(self) -> dict[str, int]:
        """width, depth and heads: the preset of `size` with any explicit overrides applied."""
        dims = dict(MODEL_SIZES[self.size])
        for key in ("width", "depth", "heads"):
            if getattr(self, key) is not None:
                dims[key] = getattr(self, key)
        return dims

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        width, heads = self.dims()["width"], self.dims()["heads"]
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if width % 4:  # half the channels encode rows, half columns, each as sin/cos pairs
            raise ValueError(f"width {width} must be divisible by 4 (2-D sin-cos positions)")
        return self


class TrainingConfig(Strict):
    global_batch: int = Field(256, ge=1, description="Images per optimizer step summed over all experts; each expert gets global_batch / K (FLOP matching).")
    total_nimg: int = Field(384_000, ge=1, description=(
        "Training images over all K experts together, split evenly (total_nimg // K each), so K = 1 and K = 8 get "
        "the same training FLOPs by construction. In router.training: the router's own images."))
    duration_nimg: int | None = Field(None, ge=1, description=(
        "Explicit per-expert (or router) override: when set it wins over total_nimg, and the experts' total "
        "becomes K x duration_nimg. None = derive from total_nimg."))
    budget_unit: Literal["images", "tokens"] = Field("images", description=(
        "What the budget (total_nimg or duration_nimg) matches between experts. images: the same images each. "
        "tokens: with aspect-ratio buckets an image's tokens depend on its bucket, so each job trains until it has "
        "seen the tokens of its images at the data.image_size square, counted step by step over its buckets "
        "(its images then vary; its training FLOPs do not)."))
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_nimg: int = Field(0, ge=0, description="Linear lr warmup; 0 = constant lr (paper).")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="Use decay min(ema_decay, (1+step)/(10+step)) so short runs give usable EMA weights.")
    grad_clip: float | None = Field(1.0, gt=0)
    timestep_sampling: Literal["uniform", "logit_normal"] = Field("logit_normal", description=(
        "Training times t: logit_normal spends the budget at intermediate t (experts); uniform covers t near 1, "
        "where sampling starts, as often as anywhere (the router's default)."))
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 autocast on GPU; CPU always runs fp32.")
    compile: bool | Literal["auto"] = Field(False, description="torch.compile the model: true = always, auto = on CUDA only, false = never.")
    tf32: bool = Field(True, description="fp32 matmuls/convolutions on CUDA use TF32 tensor cores (~8x fp32 rate; weights, loss and optimizer stay fp32).")
    deterministic: bool = Field(False, description="Deterministic CUDA kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): "
                                "bit-exact resume on GPU at ~10-30% step time. Without it bit-exact resume holds on CPU only.")
    checkpoint_every_nimg: int = Field(24_000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_nimg: int = Field(2_048, ge=1)
    sample_every_nimg: int | None = Field(None, ge=1, description="Write an EMA sample grid every this many images (None = only at the end).")
    data_workers: int = Field(0, ge=0)
    data_window_rows: int = Field(65_536, ge=1, description="Rows of shuffled shards held in memory by each training worker (plus one prefetched window); the data order depends on it.")


class RouterConfig(Strict):
    """Router of paper Algorithm 1: a DiT encoder + CLS token classifying the cluster of x_t."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(size="tiny", label_dropout=0.0, conditioning="none"))
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig(global_batch=64, total_nimg=96_000,
                                                                            timestep_sampling="uniform"))
    island: str | None = Field(None, description="Island that trains the router; None = the first island.")
    # model.conditioning = class trains p(k | x_t, t, c) (class-conditional routing); with conditioning = none,
    # class-conditional sampling adds the cluster class prior log p(c | k) to the router's logits instead.


class IslandConfig(Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]*$")
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources each worker needs; pins work to nodes that have them.")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Ray node label selector pinning work to this island.")
    num_workers: int = Field(1, ge=1, description="Data-parallel workers in one expert's training group.")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    accelerator_type: str | None = Field(None, description="e.g. H100, A10G; recorded and used as a scheduling hint.")
    per_worker_batch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(None, description="Micro-batch per worker; gradient accumulation fills the expert's effective batch. "
                                                          "auto = the largest that fits the GPU (a short probe with a 10% margin); None = no accumulation.")
    concurrency: int = Field(1, ge=1, description="Experts this island trains at once.")
    speed: float = Field(1.0, gt=0, description="Relative throughput, used by automatic expert placement.")

    def micro_batch(self, batch: int) -> int:
        """The configured micro-batch for an effective `batch` (auto starts from the whole per-worker share)."""
        return self.per_worker_batch if isinstance(self.per_worker_batch, int) else batch // self.num_workers


class IslandsConfig(Strict):
    pool: list[IslandConfig] = Field(default_factory=lambda: [IslandConfig(name="local")])
    assignment: dict[int, str] | Literal["auto"] = Field("auto", description="expert -> island name, or auto (longest job first over capacities).")
    max_retries: int = Field(3, ge=0, description="Retries of a failed expert, each from its last committed checkpoint.")
    allow_partial: bool = Field(False, description="Gather the surviving experts when one fails for good.")
    simulate: bool = Field(True, description="Local mode: give the local Ray node the islands' custom resources.")

    @model_validator(mode="after")
    def _names_unique(self) -> IslandsConfig:
        names = [i.name for i in self.pool]
        if not names:
            raise ValueError("at least one island is required")
        if len(set(names)) != len(names):
            raise ValueError(f"island names must be unique, got {names}")
        return self


class StorageConfig(Strict):
    """Object-store options. Credentials never live here: they come from the AWS environment/chain."""
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (e.g. MinIO); None = AWS or AWS_ENDPOINT_URL.")
    region: str | None = None
    retries: int = Field(30, ge=0, description="At most this many retries of a transient storage error "
                                               "(connection, 5xx, throttling).")
    backoff_s: float = Field(0.2, ge=0, description="First retry delay; doubles each retry up to backoff_max_s.")
    backoff_max_s: float = Field(10.0, ge=0, description="Longest delay between two retries.")
    retry_deadline_s: float = Field(120.0, ge=0, description="Give up retrying a transient storage error after "
                                                             "this many seconds (one line; a rerun resumes).")
    lease_ttl_s: float = Field(60.0, gt=0, description="A driver's lease on its run store expires this long "
                                                       "after its last heartbeat.")
    cache_dir: str | None = Field(None, description="Local cache for downloaded payloads (None = ~/.cache/ddm).")


class RoutingConfig(Strict):
    """How the router posterior becomes expert weights at every step (worker/sampler.py)."""
    strategy: Strategy = "top1"
    top_k: int = Field(2, ge=1, description="topk: experts kept.")
    threshold: float = Field(0.1, ge=0, le=1, description="threshold: minimum posterior kept.")
    nucleus_p: float = Field(0.9, gt=0, le=1, description="nucleus: posterior mass kept.")


class SamplingConfig(RoutingConfig):
    """Everything `Ensemble.sample` needs besides n, the condition and the seed."""
    steps: int = Field(32, ge=1, le=100_000)
    solver: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(1.0, ge=0, le=1000, description="Classifier-free guidance scale, applied per expert.")
    num_samples: int = Field(64, ge=1, le=1_000_000)

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(strategy=self.strategy, top_k=self.top_k, threshold=self.threshold,
                             nucleus_p=self.nucleus_p)


class EvalConfig(Strict):
    num_samples: int = Field(512, ge=1, le=1_000_000, description="Samples per strategy and sampling seed.")
    seeds: int = Field(3, ge=1, le=1000, description="Sampling seeds per strategy; metrics: mean and 95% interval over them.")
    strategies: list[Strategy] = Field(default_factory=lambda: ["top1", "topk", "full", "sample", "oracle"])
    inception_path: None = Field(None, description="Always null: a run never names code or weights to load for FID; "
                                 "they come from `ddm eval --inception PATH` or DDM_INCEPTION_WEIGHTS.")
    t_grid: list[float] = Field(default_factory=lambda: [0.05, 0.2, 0.4, 0.6, 0.8, 0.95])

    @field_validator("inception_path", mode="before")
    @classmethod
    def _no_stored_weights(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("a run cannot name FID weights; pass them with `ddm eval --inception PATH` or "
                             "the DDM_INCEPTION_WEIGHTS environment variable (a state dict)")
        return None

    @field_validator("strategies")
    @classmethod
    def _comparable(cls, value: list[str]) -> list[str]:
        if "single" in value:  # one fixed expert is not an ensemble strategy; report.py draws each expert alone
            raise ValueError("'single' is not a comparable strategy (it needs an expert index)")
        return value


class HiresConfig(Strict):
    """`hires`: a high-resolution continuation after the base stage (the paper's text-to-image recipe: a base
    resolution, then a larger one). Every expert and the router continue from their base exports on the same
    partitions, prepared again at `image_size` (off by default: `hires: null`)."""
    image_size: int = Field(..., ge=1, le=ModelLimits.input_side, description=(
        "The continuation's data.image_size (larger than the base's); with data.buckets its target area is image_size^2."))
    total_nimg: int = Field(96_000, ge=1, description="Images the experts see together at this stage, split over K like training.total_nimg.")
    router_nimg: int = Field(32_000, ge=1, description="Images the router sees at this stage.")
    lr: float | None = Field(None, gt=0, description="Learning rate at this stage; None = training.lr (router: router.training.lr).")


class RunConfig(Strict):
    name: str = Field("digits", description="Run name: letters, digits, '.', '_', '-' (it names folders and keys).")
    run_uri: str = Field("runs/digits", description="Run store root: local path, file://, memory:// or s3:// URL.")
    seed: int = Field(0, ge=0, description="Root of every random draw (data order, noise, init).")
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    islands: IslandsConfig = Field(default_factory=IslandsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    hires: HiresConfig | None = Field(None, description="High-resolution continuation stage; None = none.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            raise ValueError("must be a plain name (letters, digits, '.', '_', '-'; at most 128), "
                             "not empty and not a path")
        return value

    @field_validator("run_uri")
    @classmethod
    def _non_empty_uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the run store (a path or a URL)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        k = self.clustering.num_experts
        size = self.known_dataset_size()
        if size is not None and k > size:
            raise ValueError(f"clustering.num_experts = {k} exceeds the dataset size {size}")
        side = self.known_latent_side()
        for where, model in (("model", self.model), ("router.model", self.router.model)):
            if side is not None and side % model.patch_size:
                raise ValueError(f"{where}.patch_size = {model.patch_size} does not divide the latent size "
                                 f"{side}x{side} (data.image_size with latents.encoder = identity)")
        self._check_buckets()
        if self.hires is not None:
            self.hires_run_config()  # its own checks (patch size, buckets), named as hires errors
        if self.training.duration_nimg is None and self.training.total_nimg < k:
            raise ValueError(f"training.total_nimg = {self.training.total_nimg} leaves no images per expert at K = {k}")
        if self.training.global_batch % k:
            lo = (self.training.global_batch // k) * k
            raise ValueError(
                f"training.global_batch = {self.training.global_batch} does not split evenly over "
                f"{k} experts; use {lo or k} or {lo + k}")
        names = {i.name for i in self.islands.pool}
        if self.islands.assignment != "auto":
            missing = sorted(set(range(k)) - set(self.islands.assignment))
            if missing:
                raise ValueError(f"islands.assignment has no island for experts {missing}")
            extra = sorted(set(self.islands.assignment) - set(range(k)))
            if extra:
                raise ValueError(f"islands.assignment names experts {extra} but K = {k}")
            unknown = sorted(set(self.islands.assignment.values()) - names)
            if unknown:
                raise ValueError(f"islands.assignment names unknown islands {unknown}; known: {sorted(names)}")
        if self.router.island is not None and self.router.island not in names:
            raise ValueError(f"router.island = {self.router.island!r} is not an island; known: {sorted(names)}")
        router_islands = {self.router.island} if self.router.island else names
        for island in self.islands.pool:
            batches = [("expert batch", self.expert_batch)]
            if island.name in router_islands:
                batches.append(("router.training.global_batch", self.router.training.global_batch))
            for what, batch in batches:
                micro = island.micro_batch(batch)
                if micro == 0 or batch % (micro * island.num_workers):
                    raise ValueError(
                        f"island {island.name}: {island.num_workers} workers x micro-batch "
                        f"{micro} does not divide the {what} {batch}")
        return self

    def _check_buckets(self) -> None:
        """Bucket sides must make whole token grids: multiples of the VAE factor x every model's patch size.
        The VAE factor is known here for pixel-space runs (1); for VAE runs prepare checks it."""
        buckets = self.data.buckets
        if not buckets.enabled:
            return
        patch = math.lcm(self.model.patch_size, self.router.model.patch_size)
        if buckets.multiple is not None and buckets.multiple % patch:
            raise ValueError(f"data.buckets.multiple = {buckets.multiple} is not a multiple of the patch size {patch} "
                             f"(model.patch_size and router.model.patch_size)")
        if self.latents.encoder == "identity":
            self.bucket_sizes(vae_factor=1)

    def bucket_sizes(self, vae_factor: int) -> list[Bucket]:
        """The run's buckets (width, height) in pixels, sides multiples of data.buckets.multiple or, unset,
        of vae_factor x the patch size (the least common multiple of the expert's and the router's)."""
        patch = math.lcm(self.model.patch_size, self.router.model.patch_size)
        try:
            return self.data.buckets.bucket_sizes(vae_factor * patch, self.data.image_size**2)
        except ValueError as exc:
            raise ValueError(f"data.buckets.{exc}") from None

    def hires_run_config(self) -> RunConfig:
        """The config the hires stage prepares and trains with: this one at hires.image_size (buckets at its
        area), with the stage's budgets and learning rate. Raises ValueError naming `hires` when invalid."""
        h = self.hires
        if h is None:
            raise ValueError("hires: not configured (set hires.image_size)")
        if h.image_size <= self.data.image_size:
            raise ValueError(f"hires.image_size = {h.image_size} must exceed data.image_size = {self.data.image_size}")
        if self.data.buckets.enabled and self.data.buckets.sizes is not None:
            raise ValueError("hires with explicit data.buckets.sizes: the continuation's buckets are generated at "
                             "hires.image_size^2; leave data.buckets.sizes unset")
        tree = self.model_dump(mode="json")
        tree["hires"] = None
        tree["data"]["image_size"] = h.image_size
        if tree["data"]["buckets"]["target_area"] is not None:
            tree["data"]["buckets"]["target_area"] = h.image_size**2
        for section, nimg in ((tree["training"], h.total_nimg), (tree["router"]["training"], h.router_nimg)):
            section.update(total_nimg=nimg, duration_nimg=None, lr=h.lr or section["lr"])
        try:
            return RunConfig.model_validate(tree)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))
            why = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"hires.image_size = {h.image_size}: {where + ' ' if where else ''}{why}") from None

    def known_dataset_size(self) -> int | None:
        """Rows the run will have, where known before any data is read (built-in sources, max_items)."""
        size = BUILTIN_SIZES.get(self.data.source)
        if self.data.source in ("builtin:gmm", "builtin:shapes"):
            size = self.data.gmm_items
        if self.data.max_items is not None:
            size = min(size, self.data.max_items) if size else self.data.max_items
        return size

    def known_latent_side(self) -> int | None:
        """Latent height = width where known at config time: pixels (identity encoder) are image_size."""
        return self.data.image_size if self.latents.encoder == "identity" else None

    @property
    def expert_batch(self) -> int:
        """Effective batch of one expert: the global batch split over K (paper §4.1, FLOP matching)."""
        return self.training.global_batch // self.clustering.num_experts

    @property
    def expert_nimg(self) -> int:
        """Images each expert sees: training.duration_nimg when set (explicit override), else
        training.total_nimg split evenly over K, so the experts' total is the same for every K."""
        t = self.training
        return t.duration_nimg if t.duration_nimg is not None else t.total_nimg // self.clustering.num_experts

    @property
    def router_nimg(self) -> int:
        """Images the router sees: router.training.duration_nimg when set, else router.training.total_nimg."""
        t = self.router.training
        return t.duration_nimg if t.duration_nimg is not None else t.total_nimg

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none), used for stage idempotency."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ConfigError(UsageError, ValueError):
    """A config problem, already phrased as one line for the user."""


def format_validation_error(err: ValidationError, data: dict[str, Any] | None = None) -> str:
    """One line naming the field path, the value and the reason; the value is shown truncated."""
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    if not path:
        return f"config: {reason}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    value = first.get("input")
    if isinstance(value, dict) and first["type"] == "value_error":  # a section's own check: its message names the fields
        return f"config: {path}: {reason}{more}"
    return f"config: {path} = {short_value(value)}: {reason}{more}"


def short_value(value: Any, limit: int = 80) -> str:
    """A value for an error message, never longer than `limit` characters and never fully expanded:
    a container is summarised, since a YAML alias tree may expand to billions of items."""
    if isinstance(value, dict):
        return f"{{... {len(value)} keys}}"
    if isinstance(value, (list, tuple)):
        return f"[... {len(value)} items]"
    if isinstance(value, str):
        value = value[: limit + 1]
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)[: limit + 1]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# Untrusted YAML (--config, --runtime-env) is bounded twice: the file's bytes, and the number of nodes
# it expands to, since aliases let a few hundred bytes name 10^9 nodes ("billion laughs").
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def check_expanded_size(tree: Any, what: str, limit: int = MAX_YAML_NODES) -> None:
    """Raise ConfigError when `tree` has more than `limit` nodes counted as expanded (a shared alias counts
    each time it is used); the walk stops at the limit, so it costs O(limit) whatever the tree."""
    seen = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError(f"{what}: expands to more than {limit:,} values (nested YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}={raw}: empty key segment")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}={short_value(raw)}: not valid YAML ({exc.__class__.__name__})") from None
    check_expanded_size(value, f"--set {dotted}")
    node[keys[-1]] = value


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None) -> RunConfig:
    """preset (default `digits`) -> YAML file merged on top -> `key=value` overrides, validated."""
    from common.presets import PRESETS

    if preset is not None and config_file is not None:
        raise ConfigError("give either --preset or --config, not both")
    if config_file is not None:
        tree = load_yaml_mapping(config_file, "--config")
        base = tree.pop("preset", None)
        if base is not None:
            tree = _deep_merge(_preset_tree(base, PRESETS), tree)
    else:
        tree = _preset_tree(preset or "digits", PRESETS)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_yaml_mapping(path: str, flag: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a one-line ConfigError naming `flag` and the file.

    Bounded: at most MAX_YAML_BYTES of UTF-8 text, expanding to at most MAX_YAML_NODES values."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    if file.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{flag} {path}: {file.stat().st_size:,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not a UTF-8 text file") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{flag} {path}: not valid YAML: {first[:200]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{flag} {path}: top level must be a mapping")
    check_expanded_size(tree, f"{flag} {path}")
    return tree


def _preset_tree(name: str, presets: dict[str, Any]) -> dict[str, Any]:
    if name not in presets:
        raise ConfigError(f"--preset {name}: unknown preset; known: {', '.join(sorted(presets))}")
    return presets[name]().model_dump(mode="json", exclude_unset=False)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

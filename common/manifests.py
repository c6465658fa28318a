"""Schemas of everything committed to the run store (docs/design.md §4).

Every record carries `schema_version`; unknown fields are refused; every path is relative to the run
root (no scheme, no absolute path, no `..`), so a manifest cannot point a reader outside the run.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from common.buckets import MAX_BUCKET_SIDE
from common.errors import DDMError

SCHEMA_VERSION = 1
BucketSide = Annotated[int, Field(ge=1, le=MAX_BUCKET_SIDE)]  # pixels
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class ManifestError(DDMError, ValueError):
    """A record that is missing, malformed or unsafe; the message names the key and the reason."""


def check_relative_path(path: str) -> str:
    """Return `path` if it is a clean path inside the run root, else raise ValueError saying why."""
    if not path:
        raise ValueError("empty path")
    if _URL.match(path) or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", path):
        raise ValueError(f"path {path!r} is absolute or a URL; manifests hold paths relative to the run root")
    if "\\" in path or any(part == ".." for part in path.split("/")):
        raise ValueError(f"path {path!r} leaves the run root ('..' or backslash)")
    if posixpath.normpath(path) != path.rstrip("/"):
        raise ValueError(f"path {path!r} is not normalised")
    return path


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: Literal[1] = SCHEMA_VERSION


class FileRef(BaseModel):
    """An immutable payload: where it is, how big, and its sha256."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return check_relative_path(value)


class ShardRef(FileRef):
    rows: int = Field(ge=0)
    bucket: tuple[BucketSide, BucketSide] | None = Field(None, description=(
        "(width, height) in pixels of the aspect-ratio bucket every row of the shard was resized to (data.buckets); "
        "None = the data.image_size square"))

    @model_serializer(mode="wrap")
    def _omit_no_bucket(self, handler: Any) -> dict[str, Any]:
        """Unbucketed refs serialise exactly as before the field existed (manifests keep their bytes)."""
        out = handler(self)
        if out.get("bucket") is None:
            out.pop("bucket", None)
        return out


class RunRecord(Record):
    name: str
    config: dict[str, Any]
    config_fingerprint: str
    code_version: str
    created_at: str


class StageRecord(Record):
    stage: str
    fingerprint: str
    started_at: str
    finished_at: str
    duration_s: float
    counts: dict[str, int] = Field(default_factory=dict)
    outputs: list[FileRef] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    reason: str


class PreparedShard(Record):
    """data/parts/<i:05d>.json: shard i of a prepare plan (listing positions [start, stop)), committed
    by the worker that wrote it, after its payloads. A rerun of the same plan keeps it."""
    shard: int = Field(ge=0)
    plan: str = Field(description="sha256 of everything that decides the shard's bytes: config sections and listing")
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    data: ShardRef | None = Field(None, description="None when every item of the range was quarantined, or with buckets")
    bucket_data: list[ShardRef] = Field(default_factory=list, description=(
        "data.buckets: one shard per bucket present in the range (data/shards/<i>-<W>x<H>), in bucket order"))
    captions: FileRef | None = None
    keys: FileRef | None = Field(None, description="data/keys/<i>.jsonl: {index, key} per row")
    used: list[int] = Field(default_factory=list, description="listing position of each row, in row order")
    digests: list[str] = Field(default_factory=list, description="sha256 of each row's source bytes ('' for built-ins)")
    quarantined: list[tuple[int, str]] = Field(default_factory=list, description="(listing position, reason)")
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    holdout: list[ShardRef] | None = Field(None, description=(
        "data/holdout/<i>[-<W>x<H>].safetensors: the held-out rows of each data shard that has any, written by "
        "the same worker (None: a part from a worker that left them to the driver, which a resume writes)"))
    encoder_pid: int = 0

    @model_serializer(mode="wrap")
    def _omit_no_buckets(self, handler: Any) -> dict[str, Any]:
        """Unbucketed parts serialise exactly as before `bucket_data` existed."""
        out = handler(self)
        if not out.get("bucket_data"):
            out.pop("bucket_data", None)
        return out

    def payloads(self) -> list[ShardRef]:
        """The range's data shards: one, or one per bucket (none when every item was quarantined)."""
        return [self.data] if self.data is not None else list(self.bucket_data)


class DatasetManifest(Record):
    """data/dataset.json: the prepared dataset. Shards hold `latents` (bf16 unless latent_dtype says
    fp32), `features` (fp32), `labels`, `index` (the row's position in the source listing; rows of a
    shard come from one contiguous range of it) and optionally `thumbs`, `text_pooled`, `text_tokens`."""
    source: str
    discovered: int
    used: int
    quarantined: int
    latent_shape: list[int]
    feature_dim: int
    num_classes: int | None = None
    text_dim: int | None = None
    latent_scale: dict[str, float] = Field(default_factory=dict)
    latent_dtype: Literal["bf16", "fp32"] = "fp32"
    shards: list[ShardRef]
    quarantine: FileRef | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ClusterManifest(Record):
    """clusters/clusters.json: centroids, sizes and the assignment of every row."""
    method: str
    metric: str
    num_experts: int
    num_fine: int
    sizes: list[int]
    centroids: FileRef
    assignments: list[ShardRef] = Field(description="one per dataset shard: tensor `cluster` [rows]")
    report: FileRef | None = None
    images: list[FileRef] = Field(default_factory=list)


class ExpertManifest(Record):
    """experts/<k>/manifest.json: the expert's own partition; the only data it may read."""
    expert: int
    num_experts: int
    rows: int
    latent_shape: list[int]
    num_classes: int | None = None
    text_dim: int | None = None
    shards: list[ShardRef]
    class_counts: dict[int, int] = Field(default_factory=dict)


class RouterManifest(Record):
    """router/manifest.json: the router's view, all latents plus their cluster labels."""
    num_experts: int
    rows: int
    latent_shape: list[int]
    num_classes: int | None = None
    text_dim: int | None = None
    shards: list[ShardRef]
    assignments: list[ShardRef]


class CheckpointRecord(Record):
    """<job>/checkpoints/<nimg>.json: committed after every file it lists."""
    job: str
    nimg: int
    step: int
    files: list[FileRef]
    created_at: str
    metrics: dict[str, float] = Field(default_factory=dict)


class ExportRecord(Record):
    """<job>/export.json: EMA weights + model config, the lean artifact the ensemble loads."""
    job: str
    kind: Literal["expert", "router", "student"]
    nimg: int
    weights: FileRef
    model_config_file: FileRef
    final_metrics: dict[str, float] = Field(default_factory=dict)


class EnsembleMember(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expert: int
    weights: FileRef
    model_config_file: FileRef
    nimg: int
    rows: int = Field(0, ge=0, description="rows in this expert's cluster: the prior p(k) of the oracle strategy")
    class_counts: dict[int, int] = Field(default_factory=dict, description="class -> rows in this cluster: p(k | class)")


class EnsembleManifest(Record):
    """ensemble.json: written last by gather."""
    num_experts: int
    experts: list[EnsembleMember]
    missing: list[int] = Field(default_factory=list)
    router: EnsembleMember | None
    centroids: FileRef | None = None
    latent_shape: list[int]
    num_classes: int | None = None
    latents: dict[str, Any] = Field(default_factory=dict, description="latent encoder settings for decoding")
    created_at: str


class StageResult(BaseModel):
    """What a stage function returns; the orchestrator wraps it into a committed `StageRecord`."""
    model_config = ConfigDict(extra="forbid")
    counts: dict[str, int] = Field(default_factory=dict)
    outputs: list[FileRef] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)


class JobStatusRecord(Record):
    """<prefix>/status.json: the controller's view of one training job (live, overwritten)."""
    job: str
    island: str
    state: str
    attempts: int = 0
    retries: int = 0
    nimg: int = 0
    duration_nimg: int = 0
    loss: float | None = None
    img_per_s: float | None = None
    eta_s: float | None = None
    node: str | None = None
    last_error: str | None = None
    fingerprint: str = ""
    updated_at: str

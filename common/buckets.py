"""Aspect-ratio buckets (SDXL / NovelAI style): the bucket set, the nearest bucket of an image, its resize plan.

A bucket is (width, height) in pixels, both multiples of `multiple` (the VAE factor x the patch size, so a
bucket's latent is a whole token grid) and of about `target_area` pixels. Each image goes to the bucket whose
log aspect ratio is closest to its own, is scaled to cover it and centre-cropped along one axis only: the
excess that the bucket's shape requires, never more. Pure functions, no I/O; `data.buckets` configures them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The largest bucket side in pixels: ModelLimits.input_side, the largest data.image_size (common/config.py
# imports this module, so the value is repeated here; tests/unit/test_buckets.py checks they agree).
MAX_BUCKET_SIDE = 4096

Bucket = tuple[int, int]  # (width, height) in pixels


class BucketConfig(BaseModel):
    """`data.buckets`: off by default (every image is centre-cropped to the data.image_size square)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    enabled: bool = Field(False, description="Resize each image to its nearest aspect-ratio bucket instead of one square.")
    target_area: int | None = Field(None, ge=1, le=MAX_BUCKET_SIDE**2, description=(
        "Pixels per bucket (e.g. 65536 = 256^2): generated buckets have width x height <= this, as close as the "
        "multiple allows; None = data.image_size squared."))
    multiple: int | None = Field(None, ge=1, le=MAX_BUCKET_SIDE, description=(
        "Every bucket side is a multiple of this many pixels; None = the VAE factor x the patch size (1 x patch for pixel-space runs)."))
    max_aspect: float = Field(2.0, ge=1.0, le=16.0, description="Generated set: keep buckets whose long side / short side <= this.")
    min_side: int | None = Field(None, ge=1, le=MAX_BUCKET_SIDE, description="Generated set: shortest side in pixels; None = the multiple.")
    max_side: int | None = Field(None, ge=1, le=MAX_BUCKET_SIDE,
                                 description="Generated set: longest side in pixels; None = no bound but max_aspect.")
    sizes: list[Bucket] | None = Field(None, max_length=1024, description=(
        "Explicit bucket list [[width, height], ...] in pixels instead of the generated set."))

    @field_validator("sizes")
    @classmethod
    def _sizes_are_distinct_and_bounded(cls, sizes: list[Bucket] | None) -> list[Bucket] | None:
        if sizes is None:
            return None
        if not sizes:
            raise ValueError("is empty; give at least one [width, height] or leave it unset for the generated set")
        for w, h in sizes:
            if not (1 <= w <= MAX_BUCKET_SIDE and 1 <= h <= MAX_BUCKET_SIDE):
                raise ValueError(f"[{w}, {h}]: each side must be in [1, {MAX_BUCKET_SIDE}] pixels")
        duplicate = next((s for i, s in enumerate(sizes) if s in sizes[:i]), None)
        if duplicate is not None:
            raise ValueError(f"[{duplicate[0]}, {duplicate[1]}] is listed twice")
        return sizes

    @model_validator(mode="after")
    def _bounds_agree(self) -> BucketConfig:
        if self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
            raise ValueError(f"min_side = {self.min_side} is larger than max_side = {self.max_side}")
        if self.multiple is not None and (self.sizes is not None or self.target_area is not None):
            self.bucket_sizes(self.multiple, self.target_area or 1)  # what is known now is checked now
        return self

    def bucket_sizes(self, multiple: int, default_area: int) -> list[Bucket]:
        """The bucket set, sides multiples of `multiple` pixels (`self.multiple` wins when set), of about
        `target_area` pixels (`default_area` when unset): `sizes` when given, else `generate_buckets`.
        ValueError naming the field when the set cannot be built."""
        m, area = self.multiple or multiple, self.target_area or default_area
        if self.sizes is not None:
            bad = next(((w, h) for w, h in self.sizes if w % m or h % m), None)
            if bad is not None:
                raise ValueError(f"sizes: [{bad[0]}, {bad[1]}] has a side that is not a multiple of {m} pixels "
                                 f"(multiple: VAE factor x patch size)")
            return sorted(self.sizes, key=lambda b: (b[0] / b[1], b[0]))
        buckets = generate_buckets(area, m, self.max_aspect, self.min_side, self.max_side)
        if not buckets:
            raise ValueError(f"target_area = {area}: no bucket with sides multiples of {m} pixels fits "
                             f"(min_side {self.min_side or m}, max_side {self.max_side}, max_aspect {self.max_aspect})")
        return buckets


def generate_buckets(target_area: int, multiple: int, max_aspect: float = 2.0, min_side: int | None = None,
                     max_side: int | None = None) -> list[Bucket]:
    """SDXL / NovelAI buckets: for each width from min_side to max_side in steps of `multiple`, the height is
    the largest multiple keeping width x height <= target_area; the transposes are added; buckets whose
    aspect ratio exceeds max_aspect are dropped. Sorted by aspect ratio (width / height), tallest first."""
    m = multiple
    lo = max(m, math.ceil((min_side or m) / m) * m)
    hi = min(MAX_BUCKET_SIDE, max_side or MAX_BUCKET_SIDE, target_area // m)
    found: set[Bucket] = set()
    for width in range(lo, hi + 1, m):
        height = min((target_area // width) // m * m, (max_side or MAX_BUCKET_SIDE) // m * m)
        if height < lo:
            continue
        if max(width, height) / min(width, height) <= max_aspect:
            found.update({(width, height), (height, width)})
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose log aspect ratio is closest to the image's; a tie goes to the bucket whose area is
    closest to the image's, then to the first listed (deterministic for a given set)."""
    if width < 1 or height < 1:
        raise ValueError(f"image {width}x{height}: width and height must be >= 1")
    if not buckets:
        raise ValueError("buckets: empty set")
    aspect, area = math.log(width / height), math.log(width * height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 12),
                                       abs(math.log(b[0] * b[1]) - area)))


@dataclass(frozen=True)
class ResizePlan:
    """Resize the image to `resized` (width, height), then crop `box` = (left, top, right, bottom) of it,
    which is exactly `bucket`. Along one axis the resize already fits the bucket and nothing is cropped."""
    bucket: Bucket
    resized: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def cropped_fraction(self) -> float:
        """Share of the resized image's pixels that the crop removes."""
        rw, rh = self.resized
        return 1 - (self.bucket[0] * self.bucket[1]) / (rw * rh)


def resize_plan(width: int, height: int, bucket: Bucket) -> ResizePlan:
    """Scale a width x height image so that it covers `bucket` (the smallest scale that does), then centre-crop
    the excess along the one axis that has any. Integer arithmetic, so the plan is the same everywhere."""
    if width < 1 or height < 1:
        raise ValueError(f"image {width}x{height}: width and height must be >= 1")
    bw, bh = bucket
    if bw * height >= bh * width:  # the image is relatively taller than the bucket: width sets the scale
        rw, rh = bw, max(bh, (height * bw + width // 2) // width)
    else:                          # relatively wider: height sets the scale
        rw, rh = max(bw, (width * bh + height // 2) // height), bh
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return ResizePlan(bucket=(bw, bh), resized=(rw, rh), box=(left, top, left + bw, top + bh))

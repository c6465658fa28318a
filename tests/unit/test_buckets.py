"""Aspect-ratio buckets: the generated set, the nearest bucket, the resize plan, and `data.buckets` validation."""

from __future__ import annotations

import math
import random
import re

import pytest

from common.buckets import MAX_BUCKET_SIDE, BucketConfig, generate_buckets, nearest_bucket, resize_plan
from common.config import ConfigError, ModelLimits, resolve_config


def test_the_side_bound_is_the_model_limit():
    assert MAX_BUCKET_SIDE == ModelLimits.input_side


def test_generated_set_worked_examples():
    # 256^2 in steps of 64, aspect <= 2: widths 192, 256, 320 give heights 320 (341 rounded down), 256, 192
    assert generate_buckets(256 * 256, 64, 2.0) == [(192, 320), (256, 256), (320, 192)]
    # the SDXL paper's buckets at 1024^2 (Podell et al. 2023, appendix) are among those generated in steps of 64
    sdxl = generate_buckets(1024 * 1024, 64, 4.0)
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (768, 1344)} <= set(sdxl)
    assert generate_buckets(100, 64) == []  # no 64-multiple side fits 100 pixels


@pytest.mark.parametrize("seed", range(20))
def test_generated_set_properties(seed):
    rng = random.Random(seed)
    m = rng.choice([2, 8, 16, 32, 64])
    area = rng.randint(4 * m * m, 80 * m * m)
    max_aspect = rng.uniform(1.0, 4.0)
    buckets = generate_buckets(area, m, max_aspect)
    for w, h in buckets:
        assert w % m == 0 and h % m == 0 and w * h <= area
        assert max(w, h) / min(w, h) <= max_aspect
        assert (h, w) in buckets                                   # the transposes
    for w, h in buckets:  # every width's height is the largest multiple that keeps the area, or its transpose's
        assert (w * (h + m) > area) or (h * (w + m) > area)
    assert buckets == sorted(set(buckets), key=lambda b: (b[0] / b[1], b[0]))


def test_nearest_bucket_by_log_aspect_ratio():
    buckets = generate_buckets(256 * 256, 64, 2.0)
    assert nearest_bucket(640, 480, buckets) == (320, 192)      # log 4/3 is nearer log 5/3 than log 1
    assert nearest_bucket(480, 640, buckets) == (192, 320)
    assert nearest_bucket(500, 510, buckets) == (256, 256)
    assert nearest_bucket(6000, 400, buckets) == (320, 192)     # beyond the widest: the widest
    # a tie in aspect ratio goes to the bucket whose area is closest to the image's
    assert nearest_bucket(64, 64, [(128, 128), (64, 64)]) == (64, 64)
    with pytest.raises(ValueError, match=r"image 0x5: width and height must be >= 1"):
        nearest_bucket(0, 5, buckets)


@pytest.mark.parametrize("seed", range(40))
def test_resize_plan_covers_the_bucket_and_crops_one_axis_only(seed):
    rng = random.Random(seed)
    width, height = rng.randint(1, 5000), rng.randint(1, 5000)
    buckets = generate_buckets(rng.choice([64, 256, 512]) ** 2, rng.choice([8, 16, 64]), 3.0)
    bucket = nearest_bucket(width, height, buckets)
    plan = resize_plan(width, height, bucket)
    (rw, rh), (left, top, right, bottom) = plan.resized, plan.box
    assert (right - left, bottom - top) == bucket and rw >= bucket[0] and rh >= bucket[1]
    assert rw == bucket[0] or rh == bucket[1]                     # one axis is not cropped at all
    assert (left, top) == ((rw - bucket[0]) // 2, (rh - bucket[1]) // 2)  # centred
    # the resize keeps the image's aspect ratio (to the rounding of one pixel on the cropped axis)
    assert abs(rw / rh - width / height) <= width / height * (1 / min(rw, rh) + 1e-9) or rw == bucket[0] == rh
    # the minimal crop: what a cover of this bucket must lose, to that rounding
    must = 1 - min(bucket[0] / bucket[1] / (width / height), (width / height) / (bucket[0] / bucket[1]))
    assert plan.cropped_fraction <= must + 1 / min(rw, rh) + 1e-9


def test_bucketed_crop_keeps_more_than_the_square_centre_crop():
    buckets = generate_buckets(256 * 256, 64, 2.0)
    photo = resize_plan(640, 480, nearest_bucket(640, 480, buckets))
    assert photo.resized == (320, 240) and photo.box == (0, 24, 320, 216)
    assert photo.cropped_fraction == pytest.approx(0.2)
    square = resize_plan(640, 480, (256, 256))  # resized to 341 x 256 (341.3 rounded): loses a quarter of the width
    assert square.resized == (341, 256) and square.cropped_fraction == pytest.approx(1 - 256 / 341)
    assert square.cropped_fraction > photo.cropped_fraction
    exact = resize_plan(640, 384, (320, 192))
    assert exact.resized == (320, 192) and exact.box == (0, 0, 320, 192) and exact.cropped_fraction == 0


def test_buckets_are_off_by_default_and_resolve_for_the_run():
    config = resolve_config()
    assert config.data.buckets == BucketConfig() and not config.data.buckets.enabled
    digits = resolve_config(overrides=["data.buckets.enabled=true"])  # 8 px digits, patch 2: area 64, multiple 2
    assert digits.bucket_sizes(vae_factor=1) == [(6, 10), (8, 8), (10, 6)]
    big = resolve_config(overrides=["data.buckets.enabled=true", "data.buckets.target_area=65536"])
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in big.bucket_sizes(vae_factor=8))  # VAE 8 x patch 2
    explicit = resolve_config(overrides=["data.buckets.enabled=true", "data.buckets.sizes=[[12, 8], [8, 12], [8, 8]]"])
    assert explicit.bucket_sizes(vae_factor=1) == [(8, 12), (8, 8), (12, 8)]
    assert math.isclose(explicit.data.buckets.max_aspect, 2.0)


@pytest.mark.parametrize("overrides, message", [
    (["data.buckets.sizes=[[8, 6], [8, 6]]"], r"data\.buckets\.sizes = .*\[8, 6\] is listed twice"),
    (["data.buckets.sizes=[]"], r"data\.buckets\.sizes = .*is empty"),
    (["data.buckets.sizes=[[0, 8]]"], r"data\.buckets\.sizes = .*\[0, 8\]: each side must be in \[1, 4096\]"),
    (["data.buckets.enabled=true", "data.buckets.sizes=[[8, 5]]"],
     r"data\.buckets\.sizes: \[8, 5\] has a side that is not a multiple of 2 pixels"),
    (["data.buckets.enabled=true", "data.buckets.multiple=3"],
     r"data\.buckets\.multiple = 3 is not a multiple of the patch size 2"),
    (["data.buckets.multiple=64", "data.buckets.sizes=[[64, 96]]"],
     r"data\.buckets: sizes: \[64, 96\] has a side that is not a multiple of 64"),
    (["data.buckets.min_side=64", "data.buckets.max_side=32"], r"data\.buckets: min_side = 64 is larger than max_side = 32"),
    (["data.buckets.max_aspect=0.5"], r"data\.buckets\.max_aspect = 0\.5"),
    (["data.buckets.enabled=true", "data.buckets.target_area=2"], r"data\.buckets\.target_area = 2: no bucket"),
    (["data.buckets.bogus=1"], r"data\.buckets\.bogus"),
])
def test_bad_bucket_settings_are_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=overrides)
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)

"""builtin:shapes at several aspect ratios: non-square drawings, centre-cropped like files or kept for buckets."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, DataConfig, resolve_config
from worker.decode import resize_array
from worker.sources import discover


def _shapes(**kw) -> list:
    data = DataConfig(**{"source": "builtin:shapes", "image_size": 16, "channels": 3, "gmm_items": 60, **kw})
    return discover(data, seed=4).items


def test_aspect_ratios_kept_at_their_own_size_when_bucketing():
    raw = _shapes(shapes_aspect_ratios=[0.5, 1.0, 2.0], buckets={"enabled": True})
    sizes = {item.array.shape for item in raw}
    # 16^2 pixels at ratio 2: 16 sqrt 2 = 22.6 -> 23 wide, 16 / sqrt 2 = 11.3 -> 11 high; ratio 1/2 the transpose
    assert sizes == {(3, 11, 23), (3, 16, 16), (3, 23, 11)}
    again = _shapes(shapes_aspect_ratios=[0.5, 1.0, 2.0], buckets={"enabled": True})
    assert all(np.array_equal(a.array, b.array) and a.label == b.label for a, b in zip(raw, again))  # seeded
    for item in raw:  # every drawing shows its shape: some pixels far brighter than the dark background
        assert item.array.min() >= -1 and item.array.max() <= 1
        assert (item.array.max(0) > 0.3).sum() >= 4, item.source

    grey = _shapes(shapes_aspect_ratios=[0.5, 2.0], buckets={"enabled": True}, channels=1)
    assert {item.array.shape[0] for item in grey} == {1} and len({item.array.shape for item in grey}) == 2


def test_without_buckets_each_drawing_is_centre_cropped_to_the_square_like_a_file():
    raw = _shapes(shapes_aspect_ratios=[0.5, 2.0], buckets={"enabled": True})
    square = _shapes(shapes_aspect_ratios=[0.5, 2.0])
    for r, s in zip(raw, square):  # the same seeded drawings; the square set is the file rule applied to them
        assert s.array.shape == (3, 16, 16) and r.label == s.label and r.text == s.text
        expected = resize_array((r.array.transpose(1, 2, 0) + 1) / 2, 16, 3).transpose(2, 0, 1) * 2 - 1
        assert np.allclose(s.array, expected, atol=1e-6)


@pytest.mark.parametrize("value", ["[0]", "[]", "[20]"])
def test_bad_aspect_ratios_name_the_field(value):
    with pytest.raises(ConfigError, match=r"^config: data\.shapes_aspect_ratios") as err:
        resolve_config(overrides=["data.source=builtin:shapes", f"data.shapes_aspect_ratios={value}"])
    assert "\n" not in str(err.value)


def test_anywhere_placement_reaches_the_ends_that_a_centre_crop_cuts_off():
    def lost(items) -> float:  # mean share of a wide drawing's shape pixels outside its centre square
        shares = []
        for item in items:
            _, h, w = item.array.shape
            if w > h:
                shape, a = item.array.max(0) > 0.3, (w - h) // 2
                shares.append(1 - shape[:, a:a + h].sum() / max(1, shape.sum()))
        return float(np.mean(shares))

    kw = {"shapes_aspect_ratios": [0.5, 1.0, 2.0], "buckets": {"enabled": True}, "gmm_items": 200}
    centre, anywhere = _shapes(**kw), _shapes(**kw, shapes_placement="anywhere")
    assert [(a.label, a.text) for a in centre] == [(b.label, b.text) for b in anywhere]  # the same draws
    assert lost(centre) < 0.02 and lost(anywhere) > 0.25


def test_frame_placement_spans_the_drawing_so_a_centre_crop_keeps_only_its_middle():
    kw = {"shapes_aspect_ratios": [0.5, 1.0, 2.0], "buckets": {"enabled": True}, "gmm_items": 200}
    centre, frame = _shapes(**kw), _shapes(**kw, shapes_placement="frame")
    assert [(a.label, a.text) for a in centre] == [(b.label, b.text) for b in frame]  # the same draws
    lost = []
    for item in frame:
        shape = item.array.max(0) > 0.3
        _, h, w = item.array.shape
        rows, cols = np.nonzero(shape)
        # stretched over 75-95% of both sides; a diamond's thin tips fade below the threshold when downsampled
        assert cols.max() - cols.min() + 1 >= 0.6 * w and rows.max() - rows.min() + 1 >= 0.6 * h, item.source
        if w > h:
            a = (w - h) // 2
            lost.append(1 - shape[:, a:a + h].sum() / shape.sum())
    assert min(lost) > 0.1 and np.mean(lost) > 0.2  # every wide figure loses its ends to the square crop

"""Sampling a gathered ensemble at a shape other than the one it was trained at: the library and `ddm sample --size`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from tests.integration.ensemble_runs import gathered_digits
from worker.ensemble import Ensemble, EnsembleError, pixel_factor
from worker.sampler import SamplerError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """8x8 pixel-space digits, K = 2, patch 2, random exports gathered (no Ray)."""
    return gathered_digits(str(tmp_path_factory.mktemp("sizes") / "run"))[1]


def test_pixel_factor_is_read_off_the_image_and_latent_sides():
    assert pixel_factor(8, [1, 8, 8]) == 1          # identity latents: pixels
    assert pixel_factor(256, [4, 32, 32]) == 8      # an SD VAE
    with pytest.raises(EnsembleError, match=r"latent_shape = \[4, 3, 3\] does not divide data.image_size = 10"):
        pixel_factor(10, [4, 3, 3])


def test_ensemble_samples_at_a_non_square_latent_size(digits_store):
    ensemble = Ensemble.load(digits_store, device="cpu")
    native = ensemble.sample(3, "top1", steps=2, seed=1)
    assert torch.equal(native, ensemble.sample(3, "top1", steps=2, seed=1, size=(8, 8)))  # size = native: same draw
    for size in ((8, 12), (12, 6)):
        for strategy in ("top1", "full"):
            latents = ensemble.sample(3, strategy, steps=2, seed=1, size=size)
            assert latents.shape == (3, 1, *size) and torch.isfinite(latents).all()
    assert ensemble.router_posterior(latents, 0.5).shape == (3, 2)
    with pytest.raises(SamplerError, match=r"^size = 8x7 \(height x width\): each side must be a multiple of the patch size 2$"):
        ensemble.sample(1, steps=1, size=(8, 7))
    with pytest.raises(SamplerError, match=r"size = 0x8 .*must be in \[1, 4096\]"):
        ensemble.sample(1, steps=1, size=(0, 8))


def test_ddm_sample_size_writes_a_non_square_grid(digits_store, tmp_path, capsys):
    out = tmp_path / "wide.png"
    assert main(["sample", digits_store.url, "--n", "4", "--steps", "2", "--size", "12x8", "--device", "cpu",
                 "--out", str(out)]) == 0
    # make_grid: 2 x 2 tiles of 12 x 8 pixels upscaled 4x (48 // 12) to 48 x 32, 2 px padding, 12 px captions,
    # 16 px title; a square 8 x 8 sample would give 48 x 48 tiles
    assert Image.open(out).size == (2 * (48 + 2) + 2, 16 + 2 * (32 + 12 + 2) + 2)

    for flag, message in (("13x8", "error: --size 13x8: each side must be a multiple of 2 = 1 pixels per latent cell "
                                   "(the VAE factor) x patch size 2"),
                          ("12by8", "'12by8' is not WIDTHxHEIGHT in pixels")):
        capsys.readouterr()
        assert main(["sample", digits_store.url, "--n", "1", "--steps", "1", "--size", flag,
                     "--out", str(tmp_path / "bad.png")]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "--size" in lines[0], lines
    assert not (tmp_path / "bad.png").exists()

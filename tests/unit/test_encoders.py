"""Encoders through the real `from_pretrained` paths, on tiny random models saved to a temp dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import worker.encoders as enc
from common.config import FeaturesConfig, LatentsConfig, RunConfig, TextConfig
from common.manifests import DatasetManifest
from common.storage import RunStore
from worker.prepare import prepare_data

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other work


def test_each_encoder_loads_from_a_saved_directory(tiny_models):
    encoders = enc.Encoders(FeaturesConfig(extractor="dinov2", model=str(tiny_models / "dino"), batch_size=3),
                            LatentsConfig(encoder="vae", model=str(tiny_models / "sd"), subfolder="vae", batch_size=2),
                            TextConfig(encoder="clip", model=str(tiny_models / "clip"), max_length=16))
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    before = enc.ENCODE_CALLS
    out = encoders(x, ["a red circle", "a blue square", None, "b", "c"])
    assert enc.ENCODE_CALLS == before + 1
    assert out["features"].shape == (5, 32) and out["latents"].shape == (5, 4, 8, 8)
    assert out["text_pooled"].shape == (5, 32) and out["text_tokens"].shape == (5, 16, 32)
    # the pooled DINOv2 output, batched or not
    single = enc.Encoders(FeaturesConfig(extractor="dinov2", model=str(tiny_models / "dino")), LatentsConfig(),
                          TextConfig())(x[:1])["features"]
    assert np.allclose(single, out["features"][:1], atol=1e-5)
    # latents respect scaling_factor / shift_factor, and decode_latents inverts the scaling
    vae = enc.load_vae(str(tiny_models / "sd"), "vae")
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    assert np.allclose(out["latents"], ((raw - 0.1) * 0.5).numpy(), atol=1e-5)
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    assert torch.allclose(enc.decode_latents(vae, torch.from_numpy(out["latents"])), expected, atol=1e-4)
    # different captions give different embeddings; the same caption the same
    again = encoders(x[:2], ["a red circle", "a red circle"])
    assert np.allclose(again["text_pooled"][0], out["text_pooled"][0], atol=1e-5)
    assert not np.allclose(out["text_pooled"][0], out["text_pooled"][1])


def test_grayscale_inputs_are_replicated_for_rgb_models(tiny_models):
    encoders = enc.Encoders(FeaturesConfig(extractor="dinov2", model=str(tiny_models / "dino")),
                            LatentsConfig(encoder="vae", model=str(tiny_models / "sd"), subfolder="vae"), TextConfig())
    out = encoders(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert out["features"].shape == (2, 32) and out["latents"].shape == (2, 4, 8, 8)


def test_missing_model_is_a_one_line_error():
    with pytest.raises(ValueError, match="^features.model: required for extractor dinov2"):
        enc.Encoders(FeaturesConfig(extractor="dinov2"), LatentsConfig(), TextConfig())


def test_prepare_with_vae_dinov2_and_clip(tiny_models, tmp_path):
    cfg = RunConfig.model_validate({
        "data": {"source": "builtin:shapes", "image_size": 16, "channels": 3, "captions": True, "gmm_items": 12,
                 "shard_rows": 8},
        "features": {"extractor": "dinov2", "model": str(tiny_models / "dino")},
        "latents": {"encoder": "vae", "model": str(tiny_models / "sd"), "subfolder": "vae"},
        "text": {"encoder": "clip", "model": str(tiny_models / "clip"), "max_length": 8},
        "clustering": {"num_experts": 2}, "training": {"global_batch": 8}})
    store = RunStore(str(tmp_path / "run"))
    result = prepare_data(cfg, store)
    assert result.counts == {"discovered": 12, "used": 12, "quarantined": 0, "shards": 2}
    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert ds.latent_shape == [4, 8, 8] and ds.feature_dim == 32 and ds.text_dim == 32
    assert ds.latent_scale == {"scaling_factor": 0.5, "shift_factor": 0.1}
    from tests.partitions import load_numpy as load

    shard = load(store.get_payload(ds.shards[0]))
    assert shard["text_tokens"].shape == (8, 8, 32) and shard["thumbs"].shape == (8, 16, 16, 3)
    captions = [json.loads(line)["caption"] for line in store.read_bytes(ds.extra["captions"][0]["path"]).decode().splitlines()]
    assert all(c.startswith("a ") for c in captions)


def test_tensor_preprocessing_matches_the_hf_processor(tiny_models):
    """DINOv2's resize + crop + normalise as tensor ops (any device) against its saved PIL processor: equal
    up to the processor's 8-bit rounding, and the pooled features agree."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_models / "dino")
    features = enc.Dinov2Features(str(tiny_models / "dino"), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 3, 16, 16), (3, 3, 24, 40), (3, 3, 64, 48), (3, 1, 32, 32)]:  # up, non-square, down, gray
        coarse = torch.rand(shape[0], shape[1], 8, 8, generator=g)  # smooth images, like photos at this scale
        x = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear") * 2 - 1
        ours = features.preprocess(x)
        images = list(((x.repeat(1, 3 // shape[1], 1, 1) + 1) / 2).clamp(0, 1))
        ref = processor(images=images, return_tensors="pt", do_rescale=False)["pixel_values"]
        assert ours.shape == ref.shape == (shape[0], 3, 32, 32), shape
        assert (ours - ref).abs().mean() < 0.012 and (ours - ref).abs().max() < 0.06, shape  # 1/255/std ~ 0.015
        with torch.no_grad():
            pooled_ref = features.model(pixel_values=ref).pooler_output
        cos = torch.nn.functional.cosine_similarity(features(x), pooled_ref, dim=1)
        assert (cos > 0.999).all(), (shape, cos)


def test_vae_runs_in_fp32_or_bf16_never_fp16(tiny_models):
    with pytest.raises(ValueError, match="'fp32' or 'bf16'"):
        LatentsConfig(encoder="vae", model="m", dtype="fp16")
    with pytest.raises(ValueError, match="fp16"):
        enc.load_vae(str(tiny_models / "sd"), "vae", dtype="fp16")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    fp32 = enc.VaeLatents(str(tiny_models / "sd"), "vae", torch.device("cpu"))
    bf16 = enc.VaeLatents(str(tiny_models / "sd"), "vae", torch.device("cpu"), "bf16")
    assert fp32.vae.dtype == torch.float32 and bf16.vae.dtype == torch.bfloat16
    z32, z16 = fp32.encode(x), bf16.encode(x)
    assert z16.dtype == torch.float32 and torch.allclose(z16, z32, atol=0.05)

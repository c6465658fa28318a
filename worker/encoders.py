"""Encoders used by the prepare stage, each loaded by Hugging Face id or local directory through the
library's own `from_pretrained` (set HF_HUB_OFFLINE=1 to forbid downloads).

- features (clustering only, paper §4.1): DINOv2 pooled output, or downsampled `pixels`. DINOv2's
  preprocessing (resize, centre crop, normalise, as its saved image processor says) runs as tensor ops on
  the encoder's device, and the model runs in bf16 autocast on CUDA;
- latents (what experts train on): diffusers `AutoencoderKL` scaled as the model card says,
  z = (E(x) - shift_factor) * scaling_factor, or `identity` (pixel space, tiny images). The VAE runs in
  fp32 (TF32 convolutions on CUDA) or bf16, never fp16, whose range the SD VAE's activations overflow;
- text (optional): CLIP text encoder, pooled + per-token embeddings, padded to max_length.

Inputs are pixel batches x [B, C, H, W] in [-1, 1]. `ENCODE_CALLS` counts `Encoders.__call__` in this
process (the idempotency test reads it; Ray workers count in their own processes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ConfigError, FeaturesConfig, LatentsConfig, TextConfig
from worker.devices import autocast, configure_numerics, resolve_device

ENCODE_CALLS = 0


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class PixelFeatures:
    """Average-pool to size x size and flatten: a feature for tiny images and offline runs.
    (Optional PCA is fitted by the prepare stage over the dataset, not per batch.)"""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.size).flatten(1)         # [B, C*size*size]


class ImagePreprocess:
    """A Hugging Face image processor's resize (shortest edge, bicubic) -> centre crop -> normalise, as batched
    tensor ops on any device. Antialiased bicubic follows PIL's filter; unlike the PIL path it does not
    round to 8 bits in between (differences ~1e-2 after normalisation, see tests/unit/test_encoders.py)."""

    def __init__(self, processor: Any) -> None:
        size = dict(processor.size) if processor.do_resize else {}
        self.shortest_edge = size.get("shortest_edge")
        self.resize_hw = (size["height"], size["width"]) if size.get("height") else None
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else {}
        self.crop_hw = (crop["height"], crop["width"]) if crop.get("height") else None
        self.mean = torch.tensor(processor.image_mean if processor.do_normalize else [0.0] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std if processor.do_normalize else [1.0] * 3).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> pixel_values [B, 3, h, w] (float32, on x's device)."""
        x = _rgb((x.float() + 1) / 2).clamp(0, 1)                              # [B, 3, H, W] in [0, 1]
        H, W = x.shape[-2:]
        target = self.resize_hw
        if self.shortest_edge is not None:  # the short side to shortest_edge, the long side truncated
            s = self.shortest_edge
            target = (s, int(s * W / H)) if H <= W else (int(s * H / W), s)
        if target is not None and tuple(target) != (H, W):
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.crop_hw is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop_hw
            if h < ch or w < cw:  # smaller than the crop: zero-pad around it, as the HF processor does
                ph, pw = max(0, ch - h), max(0, cw - w)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class Dinov2Features:
    """Pooled DINOv2 output (CLS token after the final layer norm), as the paper clusters on."""

    def __init__(self, model: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.preprocess = ImagePreprocess(AutoImageProcessor.from_pretrained(model))
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(x.to(self.device, non_blocking=True))         # [B, 3, h, w]
        with autocast(self.device, "bf16"):
            out = self.model(pixel_values=pixels)
        return out.pooler_output.float().cpu()                                 # [B, hidden]


class IdentityLatents:
    """Pixel space: the latent is the image in [-1, 1]."""
    scale: dict[str, float] = {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # no fp16: the SD VAE overflows it


def load_vae(model: str, subfolder: str | None = None, device: torch.device | str = "cpu", dtype: str = "fp32") -> Any:
    from diffusers import AutoencoderKL

    if dtype not in VAE_DTYPES:
        raise ValueError(f"latents.dtype = {dtype!r}: the VAE runs in fp32 or bf16 (fp16 overflows)")
    return AutoencoderKL.from_pretrained(model, subfolder=subfolder, torch_dtype=VAE_DTYPES[dtype]).eval().to(device)


def vae_scale(vae: Any) -> dict[str, float]:
    """{"scaling_factor", "shift_factor"} of a loaded VAE, or of its config dict."""
    cfg = dict(vae) if isinstance(vae, dict) else dict(vae.config)
    return {"scaling_factor": float(cfg.get("scaling_factor") or 1.0),
            "shift_factor": float(cfg.get("shift_factor") or 0.0)}


def vae_config(model: str, subfolder: str | None = None) -> dict[str, Any]:
    """The VAE's config.json only (no weights), e.g. for recording its scale factors."""
    from diffusers import AutoencoderKL

    return dict(AutoencoderKL.load_config(model, subfolder=subfolder))


class VaeLatents:
    """z = (mean of the posterior - shift) * scale. The posterior mean (not a sample) keeps the
    stored latents deterministic, so a rerun rewrites identical shards."""

    def __init__(self, model: str, subfolder: str | None, device: torch.device, dtype: str = "fp32") -> None:
        self.vae = load_vae(model, subfolder, device, dtype)
        self.scale = vae_scale(self.vae)
        self.device = device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = _rgb(x.float()) if self.vae.config.in_channels == 3 else x.float()
        z = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mean
        return ((z - self.scale["shift_factor"]) * self.scale["scaling_factor"]).float().cpu()


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `VaeLatents.encode`, for the sampler: latents -> pixels in [-1, 1]."""
    s = vae_scale(vae)
    z = latents.to(vae.device, vae.dtype) / s["scaling_factor"] + s["shift_factor"]
    return vae.decode(z).sample.float().clamp(-1, 1)


class ClipText:
    """CLIP text encoder: pooled (EOS) embedding [B, D] and token embeddings [B, max_length, D]."""

    def __init__(self, model: str, max_length: int, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPTextModel

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = CLIPTextModel.from_pretrained(model).eval().to(device)
        self.max_length = min(max_length, self.model.config.max_position_embeddings)
        self.device = device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        out = self.model(input_ids=tok["input_ids"].to(self.device),
                         attention_mask=tok["attention_mask"].to(self.device))
        return out.pooler_output.float().cpu(), out.last_hidden_state.float().cpu()


class Encoders:
    """All encoders of one prepare run, built once per worker."""

    def __init__(self, features: FeaturesConfig, latents: LatentsConfig, text: TextConfig) -> None:
        self.cfg_features, self.cfg_latents = features, latents
        if torch.cuda.is_available():
            configure_numerics(tf32=True)  # fp32 VAE convolutions and matmuls on TF32 tensor cores
        if features.extractor == "dinov2":
            if not features.model:
                raise ConfigError("features.model: required for extractor dinov2 (a Hugging Face id or directory)")
            self.features: Any = Dinov2Features(features.model, resolve_device(features.device, "features.device"))
        else:
            self.features = PixelFeatures(features.pixels_size)
        if latents.encoder == "vae":
            if not latents.model:
                raise ConfigError("latents.model: required for encoder vae (a Hugging Face id or directory)")
            self.latents: Any = VaeLatents(latents.model, latents.subfolder,
                                           resolve_device(latents.device, "latents.device"), latents.dtype)
        else:
            self.latents = IdentityLatents()
        self.text: ClipText | None = None
        if text.encoder == "clip":
            if not text.model:
                raise ConfigError("text.model: required for text encoder clip")
            self.text = ClipText(text.model, text.max_length, resolve_device(latents.device, "latents.device"))

    def __call__(self, x: torch.Tensor, captions: list[str] | None = None) -> dict[str, np.ndarray]:
        """x [B, C, H, W] in [-1, 1] -> {"latents", "features"[, "text_pooled", "text_tokens"]}."""
        global ENCODE_CALLS
        ENCODE_CALLS += 1
        fb, lb = self.cfg_features.batch_size, self.cfg_latents.batch_size
        out = {
            "features": torch.cat([self.features(x[a:a + fb]) for a in range(0, len(x), fb)]),
            "latents": torch.cat([self.latents.encode(x[a:a + lb]) for a in range(0, len(x), lb)]),
        }
        if self.text is not None:
            texts = [c or "" for c in (captions or [""] * len(x))]
            pooled, tokens = zip(*(self.text(texts[a:a + lb]) for a in range(0, len(x), lb)))
            out["text_pooled"], out["text_tokens"] = torch.cat(pooled), torch.cat(tokens)
        return {k: v.contiguous().numpy() for k, v in out.items()}

"""Encoders used by the prepare stage, each loaded by Hugging Face id or local directory through the
library's own `from_pretrained` (set HF_HUB_OFFLINE=1 to forbid downloads).

- features (clustering only, paper §4.1): DINOv2 pooled output, or downsampled `pixels`;
- latents (what experts train on): diffusers `AutoencoderKL` scaled as the model card says,
  z = (E(x) - shift_factor) * scaling_factor, or `identity` (pixel space, tiny images);
- text (optional): CLIP text encoder, pooled + per-token embeddings, padded to max_length.

Inputs are pixel batches x [B, C, H, W] in [-1, 1]. `ENCODE_CALLS` counts `Encoders.__call__` in this
process (the idempotency test reads it; Ray workers count in their own processes).
"""

from __future__ import annotations

from common.config import ConfigError

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.config import FeaturesConfig, LatentsConfig, TextConfig

ENCODE_CALLS = 0


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class PixelFeatures:
    """Average-pool to size x size and flatten: a feature for tiny images and offline runs.
    (Optional PCA is fitted by the prepare stage over the dataset, not per batch.)"""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.size).flatten(1)         # [B, C*size*size]


class Dinov2Features:
    """Pooled DINOv2 output (CLS token after the final layer norm), as the paper clusters on."""

    def __init__(self, model: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = list(_rgb((x.float() + 1) / 2).clamp(0, 1))                  # B x [3, H, W] in [0, 1]
        inputs = self.processor(images=images, return_tensors="pt", do_rescale=False)
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        return out.pooler_output.float().cpu()                                 # [B, hidden]


class IdentityLatents:
    """Pixel space: the latent is the image in [-1, 1]."""
    scale: dict[str, float] = {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def load_vae(model: str, subfolder: str | None = None, device: torch.device | str = "cpu") -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, subfolder=subfolder).eval().to(device)


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

    def __init__(self, model: str, subfolder: str | None, device: torch.device) -> None:
        self.vae = load_vae(model, subfolder, device)
        self.scale = vae_scale(self.vae)
        self.device = device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = _rgb(x.float()) if self.vae.config.in_channels == 3 else x.float()
        z = self.vae.encode(x.to(self.device)).latent_dist.mean
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
        if features.extractor == "dinov2":
            if not features.model:
                raise ConfigError("features.model: required for extractor dinov2 (a Hugging Face id or directory)")
            self.features: Any = Dinov2Features(features.model, resolve_device(features.device))
        else:
            self.features = PixelFeatures(features.pixels_size)
        if latents.encoder == "vae":
            if not latents.model:
                raise ConfigError("latents.model: required for encoder vae (a Hugging Face id or directory)")
            self.latents: Any = VaeLatents(latents.model, latents.subfolder, resolve_device(latents.device))
        else:
            self.latents = IdentityLatents()
        self.text: ClipText | None = None
        if text.encoder == "clip":
            if not text.model:
                raise ConfigError("text.model: required for text encoder clip")
            self.text = ClipText(text.model, text.max_length, resolve_device(latents.device))

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

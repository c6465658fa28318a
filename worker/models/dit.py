"""A compact Diffusion Transformer (Peebles & Xie, 2023), read top to bottom like facebookresearch/DiT.

primitives (sin-cos positions, timestep embedding) -> conditioning embedders -> adaLN-Zero block ->
final layer -> DiT -> size presets -> `build_dit`. The network predicts the flow-matching velocity
v = eps - x0 of the interpolant x_t = (1 - t) x0 + t eps (docs/design.md §2), with t in [0, 1].

Conditioning (one shared embedder produces c = emb(t) + emb(cond) for every block, not one per block):
- "none":  c = emb(t).
- "class": cond = LongTensor[B]; index `num_classes` is the null class (CFG, label dropout).
- "text":  cond = Tensor[B, L, text_dim]; its mean is added to c and its tokens join the image tokens
           in every attention (joint tokens, MMDiT-style, with shared weights). All-zero = null text.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from common.config import MODEL_SIZES, ConfigError, ModelConfig, ModelLimits

DIT_SIZES = MODEL_SIZES  # the presets live with the config so that it can check them before any run


def check_dims(in_channels: int, input_size: tuple[int, int], patch_size: int, width: int, depth: int, heads: int,
               mlp_ratio: float, num_classes: int | None, text_dim: int | None, extra_params: int = 0) -> None:
    """Refuse sizes outside ModelLimits (ConfigError) before anything is allocated: a config.json read from a run or an
    export folder is untrusted, and `from_pretrained` would otherwise build whatever it asks for."""
    ints = {"in_channels": (in_channels, ModelLimits.in_channels), "patch_size": (patch_size, ModelLimits.patch_size),
            "width": (width, ModelLimits.width), "depth": (depth, ModelLimits.depth),
            "heads": (heads, ModelLimits.heads)}
    if len(input_size) != 2:
        raise ConfigError(f"input_size = {list(input_size)}: expected [height, width]")
    ints.update({"input_size": (input_size[0], ModelLimits.input_side), "input_size[1]": (input_size[1], ModelLimits.input_side)})
    if num_classes is not None:
        ints["num_classes"] = (num_classes, ModelLimits.num_classes)
    if text_dim is not None:
        ints["text_dim"] = (text_dim, ModelLimits.text_dim)
    for name, (value, limit) in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ConfigError(f"{name} = {value!r}: must be an integer in [1, {limit:,}]")
    if not (isinstance(mlp_ratio, (int, float)) and 0 < mlp_ratio <= ModelLimits.mlp_ratio):
        raise ConfigError(f"mlp_ratio = {mlp_ratio!r}: must be in (0, {ModelLimits.mlp_ratio}]")
    tokens = (input_size[0] // patch_size) * (input_size[1] // patch_size)
    if tokens > ModelLimits.tokens:
        raise ConfigError(f"input_size {input_size[0]}x{input_size[1]} / patch_size {patch_size} = {tokens:,} tokens; "
                         f"at most {ModelLimits.tokens:,}")
    params = parameter_estimate(in_channels, patch_size, width, depth, mlp_ratio, num_classes, text_dim) + extra_params
    if params > ModelLimits.parameters:
        raise ConfigError(f"width {width} x depth {depth} is about {params:,.0f} parameters; at most "
                         f"{ModelLimits.parameters:,}")


def parameter_estimate(in_channels: int, patch_size: int, width: int, depth: int, mlp_ratio: float,
                       num_classes: int | None, text_dim: int | None) -> int:
    """Parameters of a DiT, to the leading terms: per block qkv + proj + MLP + adaLN (6 D^2 + ...)."""
    per_block = (4 + 2 * mlp_ratio + 6) * width * width
    embeds = 2 * patch_size * patch_size * in_channels * width + (num_classes or 0) * width + (text_dim or 0) * width
    return int(depth * per_block + embeds + 256 * width + 4 * width * width)


# ---- primitives ------------------------------------------------------------------------------------
def sincos_pos_embed_2d(width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE / DiT): half the channels encode rows, half columns."""
    def axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)                   # [M, dim/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)            # [M, dim]
    gy, gx = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([axis(width // 2, gy), axis(width // 2, gx)], axis=1)  # [H*W, width]
    return torch.from_numpy(emb).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)                 # [B, T, D]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t (the DiT frequency range) -> MLP."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]                       # [B, half]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # [B, D]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)        # [B, T, 3, h, D/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # 3 x [B, h, T, D/h]
        out = F.scaled_dot_product_attention(q, k, v)                        # [B, h, T, D/h]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))               # [B, T, D]


class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses shift/scale/gate for attention and MLP; gates start at zero,
    so every block starts as the identity (DiT §3.2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x [B, D]
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # [B, T, D]
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))   # [B, T, D]
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)                         # 2 x [B, D]
        return self.linear(modulate(self.norm(x), shift, scale))              # [B, T, out]


class DiTTrunk(nn.Module):
    """What DiT and the router share: patch embed + positions, one condition embedder, the blocks."""

    def __init__(self, in_channels: int, input_size: tuple[int, int], patch_size: int, width: int, depth: int,
                 heads: int, mlp_ratio: float, conditioning: str, num_classes: int | None, text_dim: int | None) -> None:
        super().__init__()
        check_dims(in_channels, input_size, patch_size, width, depth, heads, mlp_ratio, num_classes, text_dim)
        H, W = input_size
        if H % patch_size or W % patch_size:
            raise ConfigError(f"model.patch_size = {patch_size} does not divide the input size {H}x{W}")
        if width % heads or (width // 2) % 2:
            raise ConfigError(f"model.width = {width} must be divisible by heads = {heads} and by 4 (sin-cos positions)")
        if conditioning == "class" and not num_classes:
            raise ConfigError("model.conditioning = 'class' needs num_classes (the data has no labels)")
        if conditioning == "text" and not text_dim:
            raise ConfigError("model.conditioning = 'text' needs text_dim (the data has no text embeddings)")
        self.conditioning, self.num_classes = conditioning, num_classes
        self.width, self.patch_size = width, patch_size
        self.patch = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        # Positions are a function of the token grid, not weights: one model trains and samples at any
        # grid (aspect-ratio buckets). Built on first use per (grid, device, dtype), never saved.
        self._pos_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self.t_embed = TimestepEmbedder(width)
        if conditioning == "class":  # one extra row: the null class used by CFG and label dropout
            self.y_embed = nn.Embedding(num_classes + 1, width)
        elif conditioning == "text":
            self.text_proj = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, columns) of a [.., height, width] input; one ConfigError when it cannot be patched."""
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(f"input {height}x{width}: not a multiple of model.patch_size = {p} on each side")
        rows, cols = height // p, width // p
        if rows * cols > ModelLimits.tokens:
            raise ConfigError(f"input {height}x{width} / patch_size {p} = {rows * cols:,} tokens; "
                              f"at most {ModelLimits.tokens:,}")
        return rows, cols

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """Sin-cos positions [1, rows * cols, D] of a token grid, on the patch weights' device and dtype
        (what a registered buffer would follow under `.to()`), cached per grid."""
        weight = self.patch.weight
        key = (rows, cols, weight.device, weight.dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = sincos_pos_embed_2d(self.width, rows, cols)[None].to(weight.device, weight.dtype)  # [1, T, D]
            self._pos_cache[key] = pos
        return pos

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Image tokens (+ joint text tokens) and the shared condition c; returns the text token count."""
        pos = self.positions(*self.grid(x.shape[-2], x.shape[-1]))            # [1, T, D]
        tokens = self.patch(x).flatten(2).transpose(1, 2) + pos               # [B, T, D]
        c = self.t_embed(t)                                                   # [B, D]
        if self.conditioning == "class":
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embed(cond)                                        # [B, D]
        elif self.conditioning == "text" and cond is not None:
            text = self.text_proj(cond.to(tokens.dtype))                      # [B, L, D]
            c = c + text.mean(dim=1)                                          # [B, D]
            tokens = torch.cat([tokens, text], dim=1)                         # [B, T + L, D]
            return tokens, c, text.shape[1]
        return tokens, c, 0

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, c)                                         # [B, T, D]
        return tokens

    def init_weights(self) -> None:
        """DiT init: xavier linears, patch embed like a linear, N(0, 0.02) embeddings, zero adaLN."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.conditioning == "class":
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)


class DiT(ModelMixin, ConfigMixin):
    """Velocity network v(x_t, t, cond) of one expert; `save_pretrained`/`from_pretrained` via diffusers.

    `input_size` is the latent size the model was built for (its data, its FLOP figures); `forward` takes
    any [B, C, H, W] whose sides are multiples of `patch_size` (positions follow the input's grid)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 4, input_size: tuple[int, int] = (32, 32), patch_size: int = 2,
                 width: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, conditioning: str = "none",
                 num_classes: int | None = None, text_dim: int | None = None) -> None:
        super().__init__()
        self.trunk = DiTTrunk(in_channels, tuple(input_size), patch_size, width, depth, heads, mlp_ratio,
                              conditioning, num_classes, text_dim)
        self.final = FinalLayer(width, patch_size * patch_size * in_channels)
        self.trunk.init_weights()
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)  # the output starts at zero velocity
        nn.init.zeros_(self.final.linear.bias)

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.conditioning == "class" else None

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens [B, T, p*p*C] of a (height/p) x (width/p) grid back to [B, C, height, width]."""
        p, C = self.config.patch_size, self.config.in_channels
        H, W = height, width
        B = x.shape[0]
        x = x.view(B, H // p, W // p, p, p, C)                                # [B, h, w, p, p, C]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)                # [B, C, H, W]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c, n_text = self.trunk.embed(x, t, cond)                      # [B, T(+L), D], [B, D]
        tokens = self.trunk(tokens, c)                                        # [B, T(+L), D]
        if n_text:
            tokens = tokens[:, :-n_text]                                      # [B, T, D]
        return self.unpatchify(self.final(tokens, c), x.shape[-2], x.shape[-1])  # [B, C, H, W]

    def flops_per_image(self, input_size: tuple[int, int] | None = None) -> float:
        """Forward matmul FLOPs for one image (2 per multiply-add) at `input_size` (default: the size it
        was built for); training costs about 3x this."""
        return dit_forward_flops(self.config.width, self.config.depth, input_size or self.config.input_size,
                                 self.config.patch_size, self.config.in_channels, self.config.mlp_ratio)


def dit_forward_flops(width: int, depth: int, input_size, patch_size: int, channels: int, mlp_ratio: float = 4.0) -> float:
    T = (input_size[0] // patch_size) * (input_size[1] // patch_size)
    per_token_block = 2 * (3 + 1 + 2 * mlp_ratio) * width**2 + 2 * 2 * T * width + 2 * 6 * width**2 / T
    embed = 2 * patch_size**2 * channels * width * 2  # patch embed + final linear
    return float(T * (depth * per_token_block + embed))


def resolve_size(model: ModelConfig) -> dict:
    """The preset of `model.size` with any explicit width/depth/heads overrides applied."""
    return model.dims()


def build_dit(model: ModelConfig, latent_shape: list[int], num_classes: int | None, text_dim: int | None) -> DiT:
    C, H, W = latent_shape
    return DiT(in_channels=C, input_size=(H, W), patch_size=model.patch_size, conditioning=model.conditioning,
               num_classes=num_classes if model.conditioning == "class" else None,
               text_dim=text_dim if model.conditioning == "text" else None, **resolve_size(model))

"""Labelled sample grids as PNG: tiles upscaled (nearest) so 8x8 digits stay readable, a caption above each."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def make_grid(images: Tensor, labels: Sequence[str] | None = None, nrow: int | None = None,
              tile: int = 48, title: str | None = None) -> Image.Image:
    """images [n, C, H, W] in [0, 1] -> one RGB picture; `labels` are drawn above the tiles."""
    n, C, H, W = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    scale = max(1, tile // max(H, W))
    th, tw = H * scale, W * scale
    cap = 12 if labels else 0
    top = 16 if title else 0
    pad = 2
    canvas = Image.new("RGB", (nrow * (tw + pad) + pad, top + rows * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()  # PIL's bundled bitmap font: no file or network needed
    if title:
        draw.text((pad, 2), title, fill="black", font=font)
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        arr = pixels[i].transpose(1, 2, 0)                                    # [H, W, C]
        img = Image.fromarray(arr[..., 0] if C == 1 else arr[..., :3]).convert("RGB")
        x, y = pad + c * (tw + pad), top + pad + r * (th + cap + pad)
        canvas.paste(img.resize((tw, th), Image.NEAREST), (x, y + cap))
        if labels:
            draw.text((x + 1, y), str(labels[i])[: max(1, tw // 6)], fill="black", font=font)
    return canvas


def write_grid(images: Tensor, path: str | Path, labels: Sequence[str] | None = None, nrow: int | None = None,
               title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, labels, nrow, title=title).save(path, format="PNG")
    return path

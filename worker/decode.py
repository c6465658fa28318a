"""Safe decoding of untrusted images and captions (docs/design.md §5 "Bad input").

Every failure raises `Quarantined` with a one-line reason whose first word is a stable kind:

    empty_file          zero bytes
    file_too_large      more bytes than data.max_file_bytes (checked before reading)
    not_an_image        Pillow cannot identify the format (e.g. text named .jpg)
    decompression_bomb  width x height above data.max_image_pixels (checked from the header, before
                        any pixel is decoded)
    truncated           the pixel stream ends early
    decode_error        any other decoder failure (named by exception type)
    bad_caption         a caption that is not UTF-8, or a .json sidecar that is not valid JSON
    duplicate           byte-identical to an earlier item (data.duplicate_policy = quarantine)

Conversions (documented behaviour, not errors):
- EXIF orientation is applied, then the image is treated as upright.
- Animated images (GIF, WebP, APNG): the first frame only.
- Palette images expand to RGB, or RGBA when they carry transparency.
- Alpha (RGBA, LA, PA, palette transparency) is composited on WHITE, so transparent regions do not
  turn into black blobs the model would have to learn.
- CMYK and other colour spaces convert through Pillow's RGB conversion (no ICC profile handling).
- 16-bit images (I;16, I) are scaled by 1/65535, not clipped at 255, so their contrast survives.
- channels = 1 uses the ITU-R 601-2 luma of RGB; channels = 3 replicates a grayscale channel.
- Size: the shorter side is resized (bicubic; JPEG uses draft decoding for speed) to image_size,
  then the centre square is cropped. With aspect-ratio buckets (data.buckets) the image is instead
  scaled to cover its nearest bucket and centre-cropped along one axis only (common/buckets.py).
- Captions: UTF-8 (a BOM is stripped); undecodable bytes QUARANTINE the item rather than being
  replaced, because a garbled caption is a wrong training pair, and the count is reported.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.buckets import Bucket, nearest_bucket, resize_plan

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag exif_transpose acts on; 1 = upright


class Quarantined(Exception):
    """An item that cannot be used; `reason` is one line starting with a stable kind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_file_size(nbytes: int | None, max_file_bytes: int) -> None:
    if nbytes == 0:
        raise Quarantined("empty_file: 0 bytes")
    if nbytes is not None and nbytes > max_file_bytes:
        raise Quarantined(f"file_too_large: {nbytes} bytes > data.max_file_bytes {max_file_bytes}")


def _open_upright(data: bytes, size: int, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Quarantined("not_an_image: the content is not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise Quarantined(f"decompression_bomb: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Quarantined(f"decompression_bomb: {w}x{h} = {w * h} pixels > data.max_image_pixels {max_pixels}")
    if w == 0 or h == 0:
        raise Quarantined(f"decode_error: degenerate size {w}x{h}")
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated: first frame
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        img.draft(img.mode, (size, size))  # decode at a reduced DCT scale, never below `size`
    img.load()
    if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return img  # upright already: exif_transpose would only copy it
    return ImageOps.exif_transpose(img)


def _classify(exc: BaseException) -> Quarantined:
    """A decoder exception -> the quarantine reason (truncation is told apart by Pillow's wording)."""
    if isinstance(exc, Quarantined):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return Quarantined(f"decompression_bomb: {exc}")
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = msg.lower()
    if isinstance(exc, EOFError) or any(w in low for w in ("truncated", "broken", "ended", "premature")):
        return Quarantined(f"truncated: {msg}")
    return Quarantined(f"decode_error: {type(exc).__name__}: {msg}")


def _normalise_mode(img: Image.Image, channels: int) -> Image.Image:
    """-> mode 'F' (16-bit sources, values in [0, 1]), or 'L' / 'RGB' (8-bit)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        f = img.convert("I").convert("F")
        return f.point(lambda v: v / 65535.0)
    if img.mode == "F":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if channels == 1:
        return img.convert("L")
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if img.mode != "F" else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _resize_to_bucket(img: Image.Image, buckets: list[Bucket]) -> tuple[Image.Image, Bucket]:
    """Scale to cover the nearest bucket, then centre-crop the excess along one axis (resize_plan)."""
    plan = resize_plan(*img.size, nearest_bucket(*img.size, buckets))
    if plan.resized != img.size:
        img = img.resize(plan.resized, Image.BICUBIC, reducing_gap=3.0 if img.mode != "F" else None)
    return img.crop(plan.box), plan.bucket


def decode_image(data: bytes, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 [size, size, channels] in [0, 1], or raise `Quarantined`."""
    return _decode(data, size, channels, max_pixels, None)[0]


def decode_image_bucketed(data: bytes, buckets: list[Bucket], channels: int, max_pixels: int
                          ) -> tuple[np.ndarray, Bucket]:
    """Bytes -> (float32 [height, width, channels] in [0, 1], its bucket (width, height)), or raise `Quarantined`."""
    return _decode(data, max(max(b) for b in buckets), channels, max_pixels, buckets)


def _decode(data: bytes, size: int, channels: int, max_pixels: int, buckets: list[Bucket] | None
            ) -> tuple[np.ndarray, Bucket | None]:
    if len(data) == 0:
        raise Quarantined("empty_file: 0 bytes")
    bucket = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF/palettes; the outcome is what counts
        try:
            img = _normalise_mode(_open_upright(data, size, max_pixels), channels)
            if buckets is None:
                img = _resize_crop(img, size)
            else:
                img, bucket = _resize_to_bucket(img, buckets)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the stage
            raise _classify(exc) from None
    return _to_array(img, channels), bucket


def _to_array(img: Image.Image, channels: int) -> np.ndarray:
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[..., None]
    else:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[-1] != channels:
        arr = np.repeat(arr, channels, axis=-1) if arr.shape[-1] == 1 else arr.mean(-1, keepdims=True)
    return np.ascontiguousarray(arr)


def resize_array(arr: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Float [H, W, C] in [0, 1] (built-in sources) -> [size, size, channels], same rules as files."""
    if arr.shape[0] != size or arr.shape[1] != size:
        planes = [np.asarray(_resize_crop(Image.fromarray(arr[..., c].astype(np.float32), mode="F"), size))
                  for c in range(arr.shape[-1])]
        arr = np.clip(np.stack(planes, -1), 0.0, 1.0)
    return to_channels(arr, channels)


def bucket_array(arr: np.ndarray, buckets: list[Bucket], channels: int) -> tuple[np.ndarray, Bucket]:
    """Float [H, W, C] in [0, 1] (built-in sources) -> ([height, width, channels], bucket), same rules as files."""
    h, w = arr.shape[:2]
    plan = resize_plan(w, h, nearest_bucket(w, h, buckets))
    if plan.resized != (w, h) or plan.bucket != (w, h):
        planes = []
        for c in range(arr.shape[-1]):
            img = Image.fromarray(arr[..., c].astype(np.float32), mode="F")
            img = img.resize(plan.resized, Image.BICUBIC) if plan.resized != (w, h) else img
            planes.append(np.asarray(img.crop(plan.box)))
        arr = np.clip(np.stack(planes, -1), 0.0, 1.0)
    return to_channels(arr, channels), plan.bucket


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Float [H, W, C] -> [H, W, channels]: grey repeated to RGB, RGB to luma; any H, W."""
    if arr.shape[-1] != channels:
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, channels, axis=-1)
        else:  # ITU-R 601-2 luma, as Pillow's convert("L")
            arr = (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_caption(data: bytes | None, kind: str = "txt") -> str | None:
    """Caption bytes -> text. `kind` json reads the `caption` (or `text`) field."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Quarantined(f"bad_caption: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if kind == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Quarantined(f"bad_caption: invalid JSON sidecar ({exc.msg} at line {exc.lineno})") from None
        value = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
        return None if value is None else str(value).strip()
    return text.strip()

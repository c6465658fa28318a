"""Where items come from: image folders and WebDataset tar shards (through fsspec), and built-ins.

Discovery only lists: it records paths, byte ranges and sizes, never pixels, so it is cheap for
large sources; workers read and decode items later (worker/decode.py). Built-in sources generate
their arrays directly ([C, H, W] float32 in [-1, 1]).

Labels (`data.label_source`): `folder` = the top-level folder under the source, as in ImageFolder
(sorted names -> 0..n-1; deeper nesting stays in that class; files at the root get -1); `file` =
`labels.jsonl` ({"key": ..., "label": ...}) or `labels.csv` (key,label), keyed by
the path relative to the source with or without extension (tar shards: the sample key);
`builtin` = the source's own labels (built-ins; the class folder for image folders, the `.cls` or
`.json` "label" for tar shards); `none` = -1 everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from common.config import DataConfig
from common.errors import UsageError
from worker.decode import IMAGE_EXTENSIONS, resize_array, to_channels

BUILTINS = ("builtin:digits", "builtin:shapes", "builtin:gmm")


@dataclass
class Item:
    source: str                                    # shown in quarantine.jsonl: relative path or shard:key
    label: int = -1
    path: str | None = None                        # fsspec path of the file (or tar shard)
    offset: int = 0                                # byte range inside `path` (tar members)
    size: int | None = None
    caption: tuple[str, int, int, str] | None = None  # (path, offset, size, "txt" | "json")
    array: np.ndarray | None = None                # built-ins: [C, H, W] float32 in [-1, 1]
    text: str | None = None                        # built-ins: caption
    payload: bytes | None = None                   # pre-read bytes (memory:// sources, which other
    caption_payload: bytes | None = None           # processes cannot see)


@dataclass
class Discovery:
    items: list[Item]
    fs: Any                                        # fsspec filesystem (picklable), None for built-ins
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SourceError(UsageError, ValueError):
    """A source that cannot be used at all (missing, empty, unreadable labels file)."""


def discover(data: DataConfig, seed: int, listed: dict[str, int] | None = None) -> Discovery:
    """The items of `data.source`, in listing order. `listed`: {key relative to the source: size} of its
    files when the caller has just listed them (the pipeline's content listing), so the source is not
    walked a second time; the items are the same either way."""
    if data.source.startswith("builtin:"):
        found = _builtin(data, seed)
    else:
        found = _files(data, listed)
    if data.max_items is not None:
        found.items = found.items[:data.max_items]
    if data.num_classes is not None:
        found.num_classes = data.num_classes
    return found


def read_item(fs: Any, item: Item) -> tuple[bytes, bytes | None]:
    """(image bytes, caption bytes or None), reading only the item's byte ranges."""
    if item.payload is not None:
        return item.payload, item.caption_payload
    data = _read_range(fs, item.path, item.offset, item.size)
    cap = None if item.caption is None else _read_range(fs, item.caption[0], item.caption[1], item.caption[2])
    return data, cap


def _read_range(fs: Any, path: str, offset: int, size: int | None) -> bytes:
    if isinstance(fs, LocalFileSystem):  # the OS directly: fsspec's open costs as much as decoding a small JPEG
        with open(path, "rb") as handle:
            if size is None:
                return handle.read()
            handle.seek(offset)
            return handle.read(size)
    if size is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + size) if size else b""


# ---- file sources -------------------------------------------------------------------------------------

def _files(data: DataConfig, listed: dict[str, int] | None = None) -> Discovery:
    fs, root = fsspec.core.url_to_fs(data.source)
    root = root.rstrip("/")
    files: dict[str, dict] = {}
    if root.endswith(".tar"):
        if not fs.exists(root):
            raise SourceError(f"data.source {data.source}: not found")
        shards = [root]
        root = posixpath.dirname(root)
    else:
        if listed is not None:
            files = {f"{root}/{key}": {"size": size, "type": "file"} for key, size in listed.items()}
        elif fs.exists(root):
            files = fs.find(root, detail=True)  # one walk: the tar shards and the images both come from it
        else:
            raise SourceError(f"data.source {data.source}: not found")
        shards = sorted(p for p in files if p.endswith(".tar"))
    found = _tar_shards(fs, root, shards, data) if shards else _image_folder(fs, root, data, files)
    if not found.items:
        raise SourceError(f"data.source {data.source}: no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found")
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "memory" in protocols:
        for item in found.items:  # memory:// lives in this process only; ship the bytes
            item.payload, item.caption_payload = read_item(fs, item)
    return found


def _rel(root: str, path: str) -> str:
    return path[len(root):].lstrip("/")


def _labels_file(fs: Any, root: str, data: DataConfig) -> dict[str, Any]:
    if not data.labels_file:
        raise SourceError("data.labels_file: required when data.label_source = file")
    path = f"{root}/{data.labels_file}"
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise SourceError(f"data.labels_file {data.labels_file}: not found under {data.source}") from None
    table: dict[str, Any] = {}
    if data.labels_file.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    table[str(row["key"])] = row["label"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SourceError(f"data.labels_file {data.labels_file}: line {n} is not "
                                      '{"key": ..., "label": ...}') from None
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if len(row) < 2 or (n == 1 and row[0].strip().lower() == "key"):
                continue
            table[row[0].strip()] = row[1].strip()
    return table


def _index_labels(raw: list[Any]) -> tuple[list[int], list[str] | None]:
    """Labels as given -> ints. All-integer labels are kept; names map to sorted indices."""
    present = [r for r in raw if r is not None]
    if all(isinstance(r, int) or (isinstance(r, str) and r.lstrip("-").isdigit()) for r in present):
        return [-1 if r is None else int(r) for r in raw], None
    names = sorted({str(r) for r in present})
    lookup = {name: i for i, name in enumerate(names)}
    return [-1 if r is None else lookup[str(r)] for r in raw], names


def _finish(items: list[Item], raw: list[Any], fs: Any) -> Discovery:
    labels, names = _index_labels(raw)
    for item, label in zip(items, labels):
        item.label = label
    known = [label for label in labels if label >= 0]
    extra = {"classes": names} if names else {}
    return Discovery(items, fs, (max(known) + 1) if known else None, extra)


def _image_folder(fs: Any, root: str, data: DataConfig, listing: dict[str, dict]) -> Discovery:
    paths = sorted(p for p, info in listing.items() if info.get("type", "file") == "file")
    present = set(paths)
    table = _labels_file(fs, root, data) if data.label_source == "file" else {}
    items, raw = [], []
    for path in paths:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        rel = _rel(root, path)
        stem = rel.rsplit(".", 1)[0]
        cap = f"{path.rsplit('.', 1)[0]}.txt"
        caption = (cap, 0, int(listing[cap].get("size") or 0), "txt") if data.captions and cap in present else None
        items.append(Item(source=rel, path=path, size=int(listing[path].get("size") or 0), caption=caption))
        if data.label_source in ("folder", "builtin"):
            raw.append(rel.split("/", 1)[0] if "/" in rel else None)
        elif data.label_source == "file":
            raw.append(table.get(rel, table.get(stem)))
        else:
            raw.append(None)
    return _finish(items, raw, fs)


def _tar_shards(fs: Any, root: str, shards: list[str], data: DataConfig) -> Discovery:
    """WebDataset layout: members `key.ext`, grouped by key (basename up to the first dot)."""
    table = _labels_file(fs, root, data) if data.label_source == "file" else {}
    items, raw = [], []
    for shard in shards:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    d, base = posixpath.split(member.name)
                    key, _, ext = base.partition(".")
                    groups.setdefault(posixpath.join(d, key), {})[ext.lower()] = member
        name = _rel(root, shard) or posixpath.basename(shard)
        for key, members in groups.items():
            image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            if image is None:
                continue
            side = members.get("txt") or members.get("json")
            caption = None
            if data.captions and side is not None:
                caption = (shard, side.offset_data, side.size, "txt" if "txt" in members else "json")
            items.append(Item(source=f"{name}:{key}", path=shard, offset=image.offset_data, size=image.size,
                              caption=caption))
            label = None
            if data.label_source == "file":
                label = table.get(key)
            elif data.label_source in ("builtin", "folder"):
                label = _tar_label(fs, shard, members)
            raw.append(label)
    return _finish(items, raw, fs)


def _tar_label(fs: Any, shard: str, members: dict[str, tarfile.TarInfo]) -> Any:
    if "cls" in members:
        return _read_range(fs, shard, members["cls"].offset_data, members["cls"].size).decode("utf-8", "replace").strip()
    if "json" in members:
        try:
            obj = json.loads(_read_range(fs, shard, members["json"].offset_data, members["json"].size))
            return obj.get("label") if isinstance(obj, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None


# ---- built-ins ------------------------------------------------------------------------------------------

def _builtin(data: DataConfig, seed: int) -> Discovery:
    if data.source == "builtin:digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # 1,797 real 8x8 digits, values 0..16
        images = digits.images.astype(np.float32) / 16.0
        items = [Item(source=f"builtin:digits#{i}", label=int(y),
                      array=_chw(resize_array(img[..., None], data.image_size, data.channels)))
                 for i, (img, y) in enumerate(zip(images, digits.target))]
        return Discovery(items, None, 10)
    if data.source == "builtin:shapes":
        return _shapes(data, seed)
    if data.source == "builtin:gmm":
        return _gmm(data, seed)
    raise SourceError(f"data.source {data.source}: unknown built-in; known: {', '.join(BUILTINS)}")


def _chw(hwc01: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc01.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)


SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "white": (245, 245, 245)}


def _shapes(data: DataConfig, seed: int) -> Discovery:
    """Seeded coloured shapes on a dark background, drawn at 4x and downsampled (anti-aliased).

    With data.shapes_aspect_ratios each image is width x height = about image_size^2 pixels at a seeded ratio
    from that list (the shape sized by the short side, or by both sides with data.shapes_placement=frame); it
    is centre-cropped to the square like a file, or, with data.buckets.enabled, kept at its own size
    [C, H, W] for prepare to resize to its bucket."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    items = []
    for i in range(data.gmm_items):
        shape, colour = int(rng.integers(len(SHAPES))), colours[int(rng.integers(len(colours)))]
        width = height = data.image_size
        if data.shapes_aspect_ratios:  # an extra draw only when asked, so square sets stay as they were
            ratio = data.shapes_aspect_ratios[int(rng.integers(len(data.shapes_aspect_ratios)))]
            width = max(1, round(data.image_size * ratio ** 0.5))
            height = max(1, round(data.image_size / ratio ** 0.5))
        sw, sh = width * 4, height * 4
        img = Image.new("RGB", (sw, sh), tuple(int(v) for v in rng.integers(0, 50, 3)))
        r = min(sw, sh) * rng.uniform(0.2, 0.35)
        u = rng.uniform(0.35, 0.65, 2)
        rx = ry = r
        if data.shapes_placement == "frame":  # the same draws: r picks a span of 75-95% of each side
            span = 0.75 + (r / min(sw, sh) - 0.2) / 0.15 * 0.2
            rx, ry = span * sw / 2, span * sh / 2
        cx, cy = sw * u[0], sh * u[1]
        if data.shapes_placement != "centre":  # the same draw, stretched to every centre the shape fits at
            t = (u - 0.35) / 0.3
            cx, cy = rx + t[0] * max(0.0, sw - 2 * rx), ry + t[1] * max(0.0, sh - 2 * ry)
        draw, fill = ImageDraw.Draw(img), COLOURS[colour]
        if SHAPES[shape] == "circle":
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif SHAPES[shape] == "square":
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif SHAPES[shape] == "triangle":
            draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=fill)
        else:
            draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=fill)
        small = np.asarray(img.resize((width, height), Image.BOX), dtype=np.float32) / 255.0
        pixels = (to_channels(small, data.channels) if data.shapes_aspect_ratios and data.buckets.enabled
                  else resize_array(small, data.image_size, data.channels))
        items.append(Item(source=f"builtin:shapes#{i}", label=shape, text=f"a {colour} {SHAPES[shape]}",
                          array=_chw(pixels)))
    return Discovery(items, None, len(SHAPES), {"classes": list(SHAPES)})


def gmm_parameters(data: DataConfig) -> dict[str, list]:
    """Isotropic mixture in D = channels * image_size^2 dims with known weights, means and stds.

    Means sit at +-a on the coordinate axes (K <= 2D), so neighbouring means are a*sqrt(2) =
    separation * std apart; std is chosen so that |mean| + 3 std = 1, i.e. the data lies roughly in
    [-1, 1]. For K > 2D the means are seeded random directions at radius a. Weights are unequal
    (proportional to 1..2) so that posteriors depend on them.
    """
    d, k, sep = data.channels * data.image_size ** 2, data.gmm_components, data.gmm_separation
    std = 1.0 / (sep / np.sqrt(2.0) + 3.0)
    a = sep * std / np.sqrt(2.0)
    if k <= 2 * d:
        means = np.zeros((k, d))
        for j in range(k):
            means[j, j % d] = a if (j // d) % 2 == 0 else -a
    else:
        dirs = np.random.default_rng(12345).standard_normal((k, d))
        means = a * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    weights = np.linspace(1.0, 2.0, k) if k > 1 else np.ones(1)
    weights = weights / weights.sum()
    return {"weights": weights.tolist(), "means": means.tolist(), "stds": [float(std)] * k}


def _gmm(data: DataConfig, seed: int) -> Discovery:
    params = gmm_parameters(data)
    rng = np.random.default_rng(seed)
    means, stds = np.asarray(params["means"]), np.asarray(params["stds"])
    comp = rng.choice(len(means), size=data.gmm_items, p=np.asarray(params["weights"]))
    x = means[comp] + stds[comp, None] * rng.standard_normal((data.gmm_items, means.shape[1]))
    shape = (data.channels, data.image_size, data.image_size)
    items = [Item(source=f"builtin:gmm#{i}", label=int(c), array=v.reshape(shape).astype(np.float32))
             for i, (v, c) in enumerate(zip(x, comp))]
    return Discovery(items, None, data.gmm_components, {"gmm": params})

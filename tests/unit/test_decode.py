"""Safe decoding: a folder mixing good images with every bad kind; documented mode conversions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from common.config import RunConfig
from common.manifests import DatasetManifest, PreparedShard, ShardRef
from common.storage import RunStore
from worker.decode import Quarantined, decode_caption, decode_image
from worker.prepare import prepare_data
from worker.prepare_shard import heldout_mask

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other work


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "WEBP")
    return buf.getvalue()


def gradient(size: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)
    arr = np.stack([np.add.outer(base, base) / 2, np.tile(base, (size, 1)), rng.uniform(0, 255, (size, size))], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def exif_rotated() -> bytes:
    """Stored 32x16 with the left half black; EXIF orientation 6 = rotate 90 degrees clockwise."""
    arr = np.full((16, 32, 3), 255, np.uint8)
    arr[:, :16] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(Image.fromarray(arr), exif=exif.tobytes())


def animated() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    return buf.getvalue()


def rgba_half_transparent() -> bytes:
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, :8, 3] = 255  # left half opaque red, right half fully transparent
    return png(Image.fromarray(arr, "RGBA"))


GOOD = {  # path -> bytes; each is usable (conversions documented in worker/decode.py)
    "cat/plain.jpg": jpeg(gradient(seed=1)),
    "cat/second.png": png(gradient(seed=2)),
    "cat/deep/nested.webp": webp(gradient(seed=3)),
    "dog/cmyk.jpg": jpeg(gradient(seed=4).convert("CMYK")),
    "dog/gray16.png": png(Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))),
    "dog/palette.png": png(gradient(seed=5).convert("P", palette=Image.ADAPTIVE, colors=16)),
    "dog/rgba.png": rgba_half_transparent(),
    "dog/la.png": png(Image.new("LA", (16, 16), (0, 0))),
    "dog/gray.png": png(gradient(seed=6).convert("L")),
    "bird/animated.webp": animated(),
    "bird/rotated.jpg": exif_rotated(),
}

BAD = {  # path -> (bytes, expected reason kind)
    "bad/empty.jpg": (b"", "empty_file"),
    "bad/truncated.jpg": (jpeg(gradient(64, seed=7))[:600], "truncated"),
    "bad/truncated.png": (png(gradient(64, seed=8))[:300], "truncated"),
    "bad/notimage.png": (b"this is a text file, not a picture\n" * 4, "not_an_image"),
    "bad/bomb.png": (png(Image.new("L", (400, 400))), "decompression_bomb"),
    "bad/huge.png": (png(Image.fromarray(np.random.default_rng(9).integers(0, 255, (60, 60, 3), dtype=np.uint8))),
                     "file_too_large"),
    "bad/badcap.jpg": (jpeg(gradient(seed=10)), "bad_caption"),
    "dog/zz_dup.png": (GOOD["cat/second.png"], "duplicate"),
}


def write_messy_folder(root: Path) -> None:
    for rel, data in {**GOOD, **{k: v[0] for k, v in BAD.items()}}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "cat/plain.txt").write_text("a striped cat\n", encoding="utf-8")
    (root / "bad/badcap.txt").write_bytes(b"caf\xe9 \xff\xfe")  # latin-1, not UTF-8
    (root / "README.md").write_text("not an image extension: never discovered")


def messy_config(root: Path, **data) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"source": str(root), "image_size": 8, "channels": 3, "label_source": "folder", "captions": True,
                 "max_image_pixels": 100_000, "max_file_bytes": 8_000, "shard_rows": 8, **data},
        "features": {"extractor": "pixels", "pixels_size": 4}, "clustering": {"num_experts": 2},
        "training": {"global_batch": 8}})


def test_messy_folder_every_item_used_or_quarantined_with_its_reason(tmp_path):
    assert all(len(v[0]) <= 8_000 for k, v in BAD.items() if k != "bad/huge.png")
    assert len(BAD["bad/huge.png"][0]) > 8_000 and all(len(v) <= 8_000 for v in GOOD.values())
    write_messy_folder(tmp_path / "src")
    store = RunStore(str(tmp_path / "run"))
    result = prepare_data(messy_config(tmp_path / "src"), store)

    n = len(GOOD) + len(BAD)
    # shard i holds the usable items of listing positions [8 i, 8 i + 8): 19 items -> 3 shards
    assert result.counts == {"discovered": n, "used": len(GOOD), "quarantined": len(BAD), "shards": 3}
    quarantine = [json.loads(line) for line in store.read_bytes("data/quarantine.jsonl").decode().splitlines()]
    reasons = {q["source"]: q["reason"] for q in quarantine}
    assert set(reasons) == set(BAD)
    for rel, (_, kind) in BAD.items():
        assert reasons[rel].startswith(kind + ":"), (rel, reasons[rel])
    assert "cat/second.png" in reasons["dog/zz_dup.png"]
    kinds = [kind for _, kind in BAD.values()]
    assert result.details["quarantine_reasons"] == {kind: kinds.count(kind) for kind in kinds}

    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert (ds.discovered, ds.used, ds.quarantined) == (n, len(GOOD), len(BAD))
    assert ds.latent_shape == [3, 8, 8] and ds.feature_dim == 3 * 4 * 4
    assert ds.extra["classes"] == ["bad", "bird", "cat", "dog"] and ds.num_classes == 4
    shards = [load_safetensors(store.get_payload(s)) for s in ds.shards]
    listing = sorted([*GOOD, *BAD])
    assert [len(s["labels"]) for s in shards] == [1, 8, 2]  # the duplicate (last) is dropped from shard 2
    assert ds.shards[2].path == "data/shards/00002-dedup.safetensors" and ds.latent_dtype == "bf16"
    latents = torch.cat([s["latents"] for s in shards])
    assert latents.dtype == torch.bfloat16 and latents.min() >= -1 and latents.max() <= 1
    assert [listing[i] for i in torch.cat([s["index"] for s in shards]).tolist()] == sorted(GOOD)
    assert shards[1]["thumbs"].shape == (8, 8, 8, 3) and shards[1]["thumbs"].dtype == torch.uint8
    labels = torch.cat([s["labels"] for s in shards]).tolist()
    assert sorted(labels) == sorted({"cat": 2, "dog": 3, "bird": 1}[k.split("/")[0]] for k in GOOD)
    captions = [json.loads(line) for ref in ds.extra["captions"]
                for line in store.read_bytes(ref["path"]).decode().splitlines()]
    assert [c["caption"] for c in captions].count("a striped cat") == 1
    assert len(captions) == len(GOOD)


def test_duplicates_kept_when_policy_is_keep(tmp_path):
    write_messy_folder(tmp_path / "src")
    result = prepare_data(messy_config(tmp_path / "src", duplicate_policy="keep"), RunStore(str(tmp_path / "run")))
    assert result.counts["used"] == len(GOOD) + 1 and result.counts["quarantined"] == len(BAD) - 1


def decode(data: bytes, size: int = 16, channels: int = 3) -> np.ndarray:
    return decode_image(data, size, channels, max_pixels=10**6)


def test_alpha_is_composited_on_white():
    x = decode(rgba_half_transparent())
    assert np.allclose(x[:, :6], [1, 0, 0], atol=0.02)   # opaque red
    assert np.allclose(x[:, 10:], 1.0, atol=0.02)         # transparent -> white
    assert np.allclose(decode(png(Image.new("LA", (16, 16), (0, 0)))), 1.0)


def test_sixteen_bit_is_scaled_not_clipped():
    x = decode(png(Image.fromarray(np.full((16, 16), 32768, np.uint16))), channels=1)
    assert x.shape == (16, 16, 1) and np.allclose(x, 32768 / 65535, atol=1e-4)


def test_exif_rotation_and_first_frame_and_modes():
    x = decode(exif_rotated(), size=16)
    # rotated 90 degrees clockwise: the black left half becomes the top half
    assert x[:6].mean() < 0.1 and x[10:].mean() > 0.9
    assert np.allclose(decode(animated()), [1, 0, 0], atol=0.02)
    cmyk = decode(jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))  # pure red in CMYK
    assert cmyk[..., 0].mean() > 0.9 and cmyk[..., 1:].mean() < 0.1
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    assert np.allclose(decode(png(pal)), [0, 1, 0], atol=0.01)
    gray = decode(png(Image.new("L", (16, 16), 128)), channels=3)
    assert gray.shape == (16, 16, 3) and np.allclose(gray, 128 / 255)
    rgb_to_gray = decode(png(Image.new("RGB", (16, 16), (255, 0, 0))), channels=1)
    assert rgb_to_gray.shape == (16, 16, 1) and abs(rgb_to_gray.mean() - 76 / 255) < 0.01  # 601-2 luma


def test_resize_shorter_side_then_centre_crop():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 4:36] = 255  # the centre square of a 2:1 image (columns 10..30) is white, with a margin
    assert np.allclose(decode(png(Image.fromarray(arr)), size=10), 1.0, atol=0.02)


def test_bomb_is_refused_from_the_header_before_decoding():
    data = png(Image.new("L", (3000, 3000)))
    with pytest.raises(Quarantined, match=r"^decompression_bomb: 3000x3000 = 9000000 pixels"):
        decode_image(data, 8, 1, max_pixels=1_000_000)


def test_captions():
    assert decode_caption("\ufeffa red circle \n".encode()) == "a red circle"
    assert decode_caption(b'{"caption": "a dog"}', "json") == "a dog"
    with pytest.raises(Quarantined, match="^bad_caption: not UTF-8"):
        decode_caption(b"\xff")
    with pytest.raises(Quarantined, match="^bad_caption: invalid JSON"):
        decode_caption(b"{oops", "json")


def test_held_out_rows_are_written_by_the_workers_and_follow_dedup(tmp_path):
    """Each worker writes the held-out rows of its own shards; a duplicate dropped by the driver leaves
    the held-out copy too, so data/holdout holds exactly heldout_mask's rows of the final data shards."""
    write_messy_folder(tmp_path / "src")
    store = RunStore(str(tmp_path / "run"))
    cfg = messy_config(tmp_path / "src", holdout_fraction=0.99)  # the duplicate's row is held out as well
    prepare_data(cfg, store)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    data = {k: torch.cat([load_safetensors(store.get_payload(s))[k] for s in ds.shards]) for k in ("index", "latents")}
    hold = ds.extra["holdout"]
    held = [load_safetensors(store.get_payload(ShardRef(**r))) for r in hold["shards"]]
    held_index = torch.cat([h["index"] for h in held])
    expect = data["index"][torch.from_numpy(heldout_mask(data["index"].numpy(), 0.99, cfg.seed))]
    dup = sorted([*GOOD, *BAD]).index("dog/zz_dup.png")
    assert dup not in data["index"].tolist() and dup not in held_index.tolist()
    assert held_index.tolist() == expect.tolist() and hold["rows"] == len(expect) > 0
    assert "data/holdout/00002-dedup.safetensors" in [r["path"] for r in hold["shards"]]
    rows = {i: j for j, i in enumerate(data["index"].tolist())}
    assert torch.equal(torch.cat([h["latents"] for h in held]), data["latents"][[rows[i] for i in held_index.tolist()]])
    parts = [store.read_record(k, PreparedShard) for k in store.list("data/parts")]
    assert all(p.holdout is not None for p in parts) and "data/holdout/00002.safetensors" in store.list("data/holdout")


def test_a_resumed_prepare_keeps_parts_whose_held_out_rows_the_driver_wrote(tmp_path):
    """A part committed by a worker that left its held-out rows to the driver is kept on resume (no shard
    is encoded again); the driver writes those rows once, to the same files a worker would."""
    write_messy_folder(tmp_path / "src")
    store = RunStore(str(tmp_path / "run"))
    cfg = messy_config(tmp_path / "src", holdout_fraction=0.5)
    prepare_data(cfg, store)
    before = store.read_record("data/dataset.json", DatasetManifest).extra["holdout"]
    for key in store.list("data/parts"):
        path = tmp_path / "run" / key
        record = json.loads(path.read_text())
        record.pop("holdout")
        path.write_text(json.dumps(record))
    store.delete("data/dataset.json")  # stopped before the dataset was committed
    resumed = prepare_data(cfg, store)
    assert resumed.details["resumed_shards"] == 3 and resumed.details["encode_processes"] == []
    after = store.read_record("data/dataset.json", DatasetManifest).extra["holdout"]
    assert after == before and before["rows"] > 0

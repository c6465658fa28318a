"""Sources: WebDataset tar shards, labels files, memory:// folders, and the built-ins."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from sklearn.datasets import load_digits

from common.config import DataConfig, RunConfig
from common.manifests import DatasetManifest
from common.storage import RunStore
from tests.unit.test_decode import gradient, jpeg, png
from worker.prepare import prepare_data
from worker.sources import SourceError, discover, gmm_parameters

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other work


def config(source: str, **data) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"source": source, "image_size": 8, "channels": 3, "shard_rows": 4, **data},
        "features": {"extractor": "pixels", "pixels_size": 2}, "clustering": {"num_experts": 2},
        "training": {"global_batch": 8}})


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root) -> None:
    """Two shards: jpg+txt+cls samples, a png+json sample, a broken image and a stray member."""
    root.mkdir(parents=True)
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i in range(3):
            add(tar, f"s{i:03d}.jpg", jpeg(gradient(seed=i)))
            add(tar, f"s{i:03d}.txt", f"caption number {i}".encode())
            add(tar, f"s{i:03d}.cls", str(i % 2).encode())
        add(tar, "broken.jpg", b"\xff\xd8\xff garbage")
    with tarfile.open(root / "shard-001.tar", "w") as tar:
        add(tar, "dir/t000.png", png(gradient(seed=10)))
        add(tar, "dir/t000.json", json.dumps({"caption": "from json", "label": 1}).encode())
        add(tar, "notes.md", b"no image in this sample")


def test_tar_shards_with_captions_and_labels(tmp_path):
    write_shards(tmp_path / "tars")
    store = RunStore(str(tmp_path / "run"))
    result = prepare_data(config(str(tmp_path / "tars"), captions=True, label_source="builtin"), store)
    # listing positions [0, 4) hold s000..s002 + broken, [4, 5) the png sample: two shards
    assert result.counts == {"discovered": 5, "used": 4, "quarantined": 1, "shards": 2}
    (q,) = [json.loads(line) for line in store.read_bytes("data/quarantine.jsonl").decode().splitlines()]
    assert q["source"] == "shard-000.tar:broken" and q["reason"].startswith(("truncated:", "not_an_image:", "decode_error:"))
    ds = store.read_record("data/dataset.json", DatasetManifest)
    shards = [load_safetensors(store.get_payload(s)) for s in ds.shards]
    assert torch.cat([s["labels"] for s in shards]).tolist() == [0, 1, 0, 1] and ds.num_classes == 2
    assert torch.cat([s["index"] for s in shards]).tolist() == [0, 1, 2, 4]  # listing positions
    captions = [json.loads(line)["caption"] for ref in ds.extra["captions"]
                for line in store.read_bytes(ref["path"]).decode().splitlines()]
    assert captions == ["caption number 0", "caption number 1", "caption number 2", "from json"]
    # the image bytes are read by byte range and decode to the same pixels as the original file
    direct = shards[1]["latents"][0].float()
    assert direct.shape == (3, 8, 8) and torch.isfinite(direct).all()


def test_single_tar_path_and_labels_file(tmp_path):
    write_shards(tmp_path / "tars")
    (tmp_path / "tars" / "labels.csv").write_text("key,label\ns000,zebra\ns001,ant\ns002,zebra\n")
    found = discover(config(str(tmp_path / "tars" / "shard-000.tar"), label_source="file",
                            labels_file="labels.csv").data, seed=0)
    assert [i.source for i in found.items] == ["shard-000.tar:s000", "shard-000.tar:s001", "shard-000.tar:s002",
                                               "shard-000.tar:broken"]
    assert [i.label for i in found.items] == [1, 0, 1, -1] and found.extra["classes"] == ["ant", "zebra"]


def test_folder_labels_jsonl_and_memory_source():
    root = f"memory://src-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for name, seed in (("a/x.png", 1), ("a/y.jpg", 2), ("b/z.png", 3)):
        fs.pipe(f"{root}/{name}", png(gradient(seed=seed)) if name.endswith("png") else jpeg(gradient(seed=seed)))
    fs.pipe(f"{root}/labels.jsonl", b'{"key": "a/x", "label": 7}\n{"key": "b/z.png", "label": 3}\n')
    found = discover(config(root, label_source="file", labels_file="labels.jsonl").data, seed=0)
    assert [(i.source, i.label) for i in found.items] == [("a/x.png", 7), ("a/y.jpg", -1), ("b/z.png", 3)]
    assert all(i.payload for i in found.items)  # memory:// is process-local: bytes travel with the item
    result = prepare_data(config(root, label_source="folder"), RunStore(f"memory://run-{uuid.uuid4().hex[:8]}"))
    assert result.counts["used"] == 3


def test_missing_source_and_missing_labels_file_are_one_line_errors(tmp_path):
    with pytest.raises(SourceError, match=r"data.source .*nope: not found"):
        discover(config(str(tmp_path / "nope")).data, 0)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(gradient()))
    with pytest.raises(SourceError, match="data.labels_file labels.csv: not found"):
        discover(config(str(tmp_path / "imgs"), label_source="file", labels_file="labels.csv").data, 0)


def test_builtin_digits_are_the_real_digits_in_minus_one_one():
    found = discover(DataConfig(source="builtin:digits", image_size=8, channels=1), seed=0)
    digits = load_digits()
    assert len(found.items) == 1797 and found.num_classes == 10
    x = np.stack([i.array for i in found.items])
    assert x.shape == (1797, 1, 8, 8)
    assert np.allclose(x[:, 0], digits.images / 16 * 2 - 1, atol=1e-6)
    assert [i.label for i in found.items] == digits.target.tolist()


def test_builtin_gmm_records_its_exact_parameters_and_samples_match(tmp_path):
    cfg = config("builtin:gmm", image_size=2, channels=1, gmm_components=4, gmm_items=4000, gmm_separation=4.0,
                 shard_rows=4096, label_source="builtin")
    store = RunStore(str(tmp_path / "run"))
    prepare_data(cfg, store)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    params = ds.extra["gmm"]
    assert params == gmm_parameters(cfg.data)
    means, stds, weights = np.array(params["means"]), np.array(params["stds"]), np.array(params["weights"])
    assert means.shape == (4, 4) and ds.latent_shape == [1, 2, 2] and np.isclose(weights.sum(), 1)
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert np.isclose(d[d > 0].min(), 4.0 * stds[0])  # neighbouring means: separation x std apart
    shard = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in load_safetensors(store.get_payload(ds.shards[0])).items()}
    x, y = shard["latents"].reshape(len(shard["labels"]), -1), shard["labels"]
    assert np.abs(x).mean() < 1 and (np.abs(x) <= 1.2).mean() > 0.99  # roughly in [-1, 1]
    for k in range(4):
        assert np.allclose(x[y == k].mean(0), means[k], atol=0.03)
        assert np.isclose((x[y == k] - means[k]).std(), stds[k], rtol=0.1)
        assert abs((y == k).mean() - weights[k]) < 0.03
    # the pixels extractor at full size is the point itself (features fp32, latents stored as bf16)
    assert np.allclose(shard["features"], x, atol=2 ** -8, rtol=2 ** -8)


def test_builtin_shapes_captions_name_the_labelled_shape():
    found = discover(DataConfig(source="builtin:shapes", image_size=16, channels=3, gmm_items=64), seed=3)
    again = discover(DataConfig(source="builtin:shapes", image_size=16, channels=3, gmm_items=64), seed=3)
    assert all(np.array_equal(a.array, b.array) for a, b in zip(found.items, again.items))  # seeded
    names = found.extra["classes"]
    for item in found.items:
        assert item.text.startswith("a ") and item.text.endswith(names[item.label])
        assert item.array.shape == (3, 16, 16) and item.array.min() >= -1 and item.array.max() <= 1
    assert len({i.label for i in found.items}) == 4


@pytest.mark.parametrize("layout", ["folder", "tars", "one-tar"])
def test_discovery_from_the_pipelines_listing_equals_walking_the_source(tmp_path, layout):
    """The pipeline hands prepare its content listing so the source is walked once; the items (and so the
    plan every shard's bytes depend on) are exactly what a walk finds."""
    from worker.listing import list_source

    if layout == "folder":
        source = tmp_path / "src"
        for name, seed in (("a/x.png", 1), ("a/y.jpg", 2), ("b/z.png", 3), ("z.png", 4)):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(png(gradient(seed=seed)) if name.endswith("png") else jpeg(gradient(seed=seed)))
        (source / "a" / "x.txt").write_text("a caption")
        (source / "notes.md").write_text("not an input")
        data = config(str(source), captions=True, label_source="folder").data
    else:
        write_shards(tmp_path / "tars")
        source = tmp_path / "tars" / "shard-000.tar" if layout == "one-tar" else tmp_path / "tars"
        data = config(str(source), captions=True, label_source="builtin").data
    listing = list_source(data)
    walked, reused = discover(data, 0), discover(data, 0, listing.sizes())
    assert reused.items == walked.items and len(walked.items) >= 4
    assert (reused.num_classes, reused.extra) == (walked.num_classes, walked.extra)
    assert (listing.sizes() is None) == (layout == "one-tar")  # one shard: keys are relative to its folder

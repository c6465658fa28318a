"""Text conditioning end to end: captions in WebDataset tar shards of mixed aspect ratios -> aspect-ratio
buckets -> CLIP tokens -> text-conditional experts and router on Ray -> `ddm sample --prompt --size`."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from common.config import resolve_config
from common.manifests import ExpertManifest
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline
from worker.encoders import ClipText
from worker.ensemble import Ensemble

pytestmark = pytest.mark.ray
COLOURS = {"red": (220, 40, 40), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SIZES = [(24, 12), (16, 16), (12, 24)]  # width x height: aspect ratios 2, 1 and 0.5


def write_captioned_tars(root, n: int = 128) -> None:
    """Two WebDataset shards of `n` PNG + .txt samples: a circle or a square in a colour, at three aspect ratios."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                (w, h), colour = SIZES[i % 3], list(COLOURS)[int(rng.integers(3))]
                shape = ("circle", "square")[int(rng.integers(2))]
                img = Image.new("RGB", (w, h), (10, 10, 10))
                r, cx, cy = min(w, h) * 0.35, w / 2, h / 2
                (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
                    [cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                for name, data in ((f"s{i:04d}.png", buf.getvalue()), (f"s{i:04d}.txt", f"a {colour} {shape}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_text_conditional_run_samples_from_a_prompt(ray_session, tiny_models, tmp_path, capsys) -> None:
    clip = str(tiny_models / "clip")
    write_captioned_tars(tmp_path / "tars")
    config = resolve_config("shapes", overrides=[
        f"run_uri={tmp_path / 'run'}", f"data.source={tmp_path / 'tars'}", "data.label_source=none",
        "data.captions=true", "data.buckets.enabled=true", "data.shard_rows=32",
        "model.conditioning=text", "text.encoder=clip",
        f"text.model={clip}", "text.max_length=16", "clustering.num_experts=2", "clustering.num_fine_centroids=8",
        "training.global_batch=32", "training.duration_nimg=320", "training.checkpoint_every_nimg=320",
        "router.training.global_batch=32", "router.training.duration_nimg=160", "router.training.checkpoint_every_nimg=160",
        "sampling.steps=2", "sampling.num_samples=4", "prepare.num_workers=1"])
    run_pipeline(config, show_progress=False)
    store = RunStore(config.run_uri)
    manifest = store.read_record("experts/00/manifest.json", ExpertManifest)
    assert manifest.text_dim == 32  # the experts were given the captions' token embeddings
    buckets = {tuple(s.bucket) for k in range(2)  # each tar member resized to its nearest bucket
               for s in store.read_record(f"experts/{k:02d}/manifest.json", ExpertManifest).shards}
    assert buckets == {(20, 12), (16, 16), (12, 20)}

    ensemble = Ensemble.load(store)
    encode = ClipText(clip, 16, torch.device("cpu"))
    red, blue = encode(["a red circle"])[1], encode(["a blue square"])[1]
    kwargs = dict(n=2, steps=2, cfg_scale=2.0, seed=0)
    assert not torch.equal(ensemble.sample(text=red, **kwargs), ensemble.sample(text=blue, **kwargs))

    out = tmp_path / "prompt.png"
    prompt = ["sample", config.run_uri, "--prompt", "a red circle", "--n", "4", "--steps", "2", "--out", str(out)]
    capsys.readouterr()
    assert main(prompt) == 2  # the text encoder lives outside the run: loading it is the user's explicit call
    assert capsys.readouterr().err.strip().endswith("needs allow_external_models=True (--trust-remote-paths)")
    for size in ("20x12", "12x20"):  # a prompt at either non-square bucket's shape
        assert main([*prompt, "--trust-remote-paths", "--size", size]) == 0
        assert Image.open(out).size[0] > 0
    wide = ensemble.sample(text=red, size=(12, 20), **kwargs)
    assert wide.shape[2:] == (12, 20) and torch.isfinite(wide).all()
    capsys.readouterr()
    assert main(["sample", config.run_uri, "--class", "1", "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    assert "not class-conditional" in capsys.readouterr().err

"""Text conditioning end to end: captions -> CLIP tokens -> text-conditional experts -> `ddm sample --prompt`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from common.config import resolve_config
from common.manifests import ExpertManifest
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline
from worker.encoders import ClipText
from worker.ensemble import Ensemble

pytestmark = pytest.mark.ray


def test_text_conditional_run_samples_from_a_prompt(ray_session, tiny_models, tmp_path, capsys) -> None:
    clip = str(tiny_models / "clip")
    config = resolve_config("shapes", overrides=[
        f"run_uri={tmp_path / 'run'}", "data.gmm_items=128", "model.conditioning=text", "text.encoder=clip",
        f"text.model={clip}", "text.max_length=16", "clustering.num_experts=2", "clustering.num_fine_centroids=8",
        "training.global_batch=32", "training.duration_nimg=320", "training.checkpoint_every_nimg=320",
        "router.training.global_batch=32", "router.training.duration_nimg=160", "router.training.checkpoint_every_nimg=160",
        "sampling.steps=2", "sampling.num_samples=4", "prepare.num_workers=1"])
    run_pipeline(config, show_progress=False)
    store = RunStore(config.run_uri)
    manifest = store.read_record("experts/00/manifest.json", ExpertManifest)
    assert manifest.text_dim == 32  # the experts were given the captions' token embeddings

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
    assert main([*prompt, "--trust-remote-paths"]) == 0
    assert Image.open(out).size[0] > 0
    capsys.readouterr()
    assert main(["sample", config.run_uri, "--class", "1", "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    assert "not class-conditional" in capsys.readouterr().err

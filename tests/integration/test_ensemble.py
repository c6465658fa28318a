"""Gather + Ensemble: checksums, partial ensembles, export folder, S3 without Ray, CLI sampling."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch

from common.manifests import EnsembleManifest
from common.storage import IntegrityError, RunStore
from tests.integration.ensemble_runs import digits_config, digits_run, random_exports
from worker.ensemble import Ensemble
from worker.gather import GatherError, gather
from worker.sampler import SamplerError


@pytest.fixture
def digits_store(tmp_path):
    torch.set_num_threads(1)
    url = str(tmp_path / "run")
    config = digits_config(url, K=2)
    store = RunStore(url)
    digits_run(store, config)
    random_exports(store, config)
    return config, store


def test_gather_commits_the_manifest_last_and_loads(digits_store):
    config, store = digits_store
    result = gather(config, store)
    assert result.counts == {"experts": 2, "missing": 0}
    manifest = store.read_record("ensemble.json", EnsembleManifest)
    assert [m.expert for m in manifest.experts] == [0, 1] and manifest.router is not None
    assert manifest.experts[1].class_counts == {1: 182, 3: 183, 5: 182, 7: 179, 9: 180}  # odd digits
    ensemble = Ensemble.load(store.url)
    x = ensemble.sample(10, steps=3, cfg_scale=2.0, seed=1)
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, ensemble.sample(10, steps=3, cfg_scale=2.0, seed=1))  # seeded


def test_gather_refuses_an_altered_export(digits_store):
    config, store = digits_store
    ref = store.read_record("ensemble.json", EnsembleManifest)
    assert ref is None  # not gathered yet
    from common.manifests import ExportRecord

    record = store.read_record("experts/01/export.json", ExportRecord)
    data = bytearray(store.read_bytes(record.weights.path))
    data[-1] ^= 0xFF
    store.write_bytes(record.weights.path, bytes(data))
    with pytest.raises(IntegrityError, match="experts/01/export"):
        gather(config, store)
    assert not store.exists("ensemble.json")


def test_partial_gather_renormalises_over_present_experts(tmp_path):
    url = str(tmp_path / "run")
    config = digits_config(url, K=3)
    store = RunStore(url)
    digits_run(store, config)
    random_exports(store, config, skip=(1,))
    with pytest.raises(GatherError, match=r"experts \[1\].*allow_partial"):
        gather(config, store)
    result = gather(config, store, allow_partial=True)
    assert result.details["missing"] == [1]
    ensemble = Ensemble.load(url)
    x = torch.randn(32, 1, 8, 8)
    p = ensemble.router_posterior(x, 0.5)
    assert torch.allclose(p.sum(1), torch.ones(32)) and (p[:, 1] == 0).all() and (p[:, [0, 2]] > 0).all()
    for strategy in ("top1", "full", "sample", "oracle"):
        assert torch.isfinite(ensemble.sample(6, strategy=strategy, steps=2)).all()
    with pytest.raises(SamplerError, match="expert 1"):
        ensemble.sample(2, strategy="single", expert=1, steps=1)


def test_export_folder_is_self_contained(digits_store, tmp_path):
    config, store = digits_store
    gather(config, store)
    ensemble = Ensemble.load(store.url)
    folder = ensemble.export(tmp_path / "exported")
    assert (folder / "ensemble.json").is_file()
    # 3 configs + manifest; 3 weights + centroids
    assert sorted(p.suffix for p in folder.rglob("*.*")) == [".json"] * 4 + [".safetensors"] * 4
    store.delete("experts")  # the folder must not need the run store
    copy = Ensemble.load(str(folder))
    torch.testing.assert_close(copy.sample(8, steps=3, seed=3), ensemble.sample(8, steps=3, seed=3))


def test_load_from_s3_samples_without_ray(s3_endpoint, tmp_path):
    url = f"s3://ddm-test/ens-{uuid.uuid4().hex[:8]}"
    config = digits_config(url, K=2)
    store = RunStore(url)
    digits_run(store, config)
    random_exports(store, config)
    gather(config, store)
    code = (f"import sys, torch; from worker.ensemble import Ensemble; "
            f"e = Ensemble.load({url!r}); x = e.sample(4, steps=2); "
            f"assert 'ray' not in sys.modules, 'ray imported'; print(tuple(x.shape))")
    env = {**__import__("os").environ, "HOME": str(tmp_path)}  # fresh payload cache: really downloads
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(4, 1, 8, 8)"
    assert list((tmp_path / ".cache" / "ddm").rglob("*.safetensors"))


def test_bad_arguments_are_one_line_errors(digits_store):
    config, store = digits_store
    gather(config, store)
    ensemble = Ensemble.load(store.url)
    with pytest.raises(SamplerError, match="classes: label 12: out of range"):
        ensemble.sample(2, classes=12, steps=1)
    with pytest.raises(SamplerError, match="strategy = \"best\""):
        ensemble.sample(2, strategy="best", steps=1)
    with pytest.raises(SamplerError, match="give the expert"):
        ensemble.sample(2, strategy="single", steps=1)


def test_class_prior_keeps_a_class_away_from_experts_that_never_saw_it(digits_store):
    """Clusters are digit parity: with the p(c | k) prior, top-1 never sends an even digit to the odd expert."""
    config, store = digits_store
    gather(config, store)
    ensemble = Ensemble.load(store.url)
    cond = torch.arange(20) % 10
    log_prior = ensemble.class_log_prior(cond)
    assert (log_prior.argmax(1) == cond % 2).all()
    # At t = 1, x_1 is independent of the cluster, so a trained router is blind there: model that
    # exactly (uniform logits) rather than trusting a random head whose logits are arbitrary.
    torch.nn.init.zeros_(ensemble.router.head.weight)
    torch.nn.init.zeros_(ensemble.router.head.bias)
    x = torch.randn(20, 1, 8, 8)
    field = ensemble.velocity_field("top1", cond=cond)
    weights = field.weights(x, torch.full((20,), 1.0))
    assert (weights.argmax(1) == cond % 2).all()

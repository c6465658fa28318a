"""A run store or an export folder is untrusted input: it loads models only from inside itself unless the user
says otherwise, never runs stored code, cannot make the report write elsewhere or inject markup, and cannot
make a load or a sampling call allocate without bound."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.manifests import EnsembleManifest, RunRecord
from common.storage import RunStore
from orchestrator.cli import main
from tests.integration.ensemble_runs import digits_config, gathered_digits
from worker.ensemble import Ensemble, EnsembleError
from worker.sampler import SamplerError


@pytest.fixture
def digits_store(tmp_path):
    torch.set_num_threads(1)
    return gathered_digits(str(tmp_path / "run"))


def _rewrite_ensemble(store: RunStore, **changes) -> None:
    manifest = store.read_record("ensemble.json", EnsembleManifest)
    store.commit("ensemble.json", manifest.model_copy(update=changes))


def _root(store: RunStore) -> Path:
    return Path(store.url.removeprefix("file://"))


# ---- models only from inside the run ------------------------------------------------------------------
def test_case9_vae_outside_the_run_loads_only_with_explicit_trust(digits_store, tiny_models, capsys):
    _, store = digits_store
    outside = str(tiny_models / "sd")
    _rewrite_ensemble(store, latents={"encoder": "vae", "model": outside, "subfolder": "vae"})
    z = torch.randn(2, 4, 4, 4)
    with pytest.raises(EnsembleError, match=r"latents.model = '.*/sd' \(subfolder 'vae'\) is not a folder inside "
                                                 r".*; loading it needs allow_external_models=True"):
        Ensemble.load(store).decode(z)
    assert Ensemble.load(store, allow_external_models=True).decode(z).shape == (2, 3, 8, 8)

    shutil.copytree(tiny_models / "sd", _root(store) / "models" / "sd")  # a VAE shipped inside the run loads as is
    _rewrite_ensemble(store, latents={"encoder": "vae", "model": "models/sd", "subfolder": "vae"})
    assert Ensemble.load(store).decode(z).shape == (2, 3, 8, 8)
    _rewrite_ensemble(store, latents={"encoder": "vae", "model": "models/sd", "subfolder": f"../../../..{outside}/vae"})
    with pytest.raises(EnsembleError, match="is not a folder inside"):
        Ensemble.load(store).decode(z)

    _rewrite_ensemble(store, latents={"encoder": "vae", "model": outside, "subfolder": "vae"})
    assert main(["sample", store.url, "--steps", "1", "--n", "2", "--out", str(_root(store) / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("needs allow_external_models=True (--trust-remote-paths)")


def test_case9_payload_symlinked_outside_the_run_is_refused(digits_store, tmp_path):
    _, store = digits_store
    manifest = store.read_record("ensemble.json", EnsembleManifest)
    inside = _root(store) / manifest.experts[0].model_config_file.path
    outside = tmp_path / "elsewhere" / "config.json"
    outside.parent.mkdir()
    shutil.copyfile(inside, outside)  # same bytes, same sha256: only the location differs
    inside.unlink()
    inside.symlink_to(outside)
    with pytest.raises(EnsembleError, match="config.json: resolves outside .*allow_external_models=True"):
        Ensemble.load(store)
    assert Ensemble.load(store, allow_external_models=True).present_ids == [0, 1]


# ---- sizes in a stored config.json are bounded before allocation -----------------------------------------
def test_case9_config_json_sizes_are_bounded_before_allocation(digits_store):
    _, store = digits_store
    manifest = store.read_record("ensemble.json", EnsembleManifest)
    member = manifest.experts[0]
    cfg = json.loads(store.get_payload(member.model_config_file))
    cfg.update(width=2**20, depth=1, heads=1)  # 2^40 floats in one layer: 4 TB
    ref = store.put_payload("experts/00/export/huge/config.json", json.dumps(cfg).encode())
    _rewrite_ensemble(store, experts=[member.model_copy(update={"model_config_file": ref}), *manifest.experts[1:]])
    with pytest.raises(EnsembleError, match=r"^experts/00/export/huge/config.json: width = 1048576: must be an "
                                            r"integer in \[1, 8,192\]$"):
        Ensemble.load(store)


@pytest.mark.parametrize("change, message", [
    (dict(input_size=[4096, 4096], patch_size=1), "16,777,216 tokens; at most 65,536"),
    (dict(width=8192, depth=256, heads=8), "parameters; at most 20,000,000,000"),
    (dict(num_classes=10**9), "num_classes = 1000000000: must be an integer in [1, 1,000,000]"),
    (dict(in_channels=-1), "in_channels = -1: must be an integer"),
])
def test_case9_model_limits_hold_for_every_size(change, message):
    from worker.models.dit import DiT

    kwargs = dict(in_channels=1, input_size=(8, 8), patch_size=2, width=32, depth=1, heads=2, conditioning="class",
                  num_classes=10)
    with pytest.raises(ValueError) as err:
        DiT(**{**kwargs, **change})
    assert message in str(err.value)


def test_case9_ensemble_json_sizes_are_bounded(digits_store):
    _, store = digits_store
    _rewrite_ensemble(store, num_experts=10**12)
    with pytest.raises(EnsembleError, match=r"num_experts = 1000000000000 is outside \[1, 4096\]"):
        Ensemble.load(store)


# ---- sampling arguments --------------------------------------------------------------------------------
def test_case9_sample_refuses_nan_cfg_and_unbounded_n(digits_store, capsys):
    _, store = digits_store
    out = _root(store) / "nan.png"
    assert main(["sample", store.url, "--cfg", "nan", "--steps", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: --cfg = NaN: Input should be a finite number"
    assert not out.exists()
    assert main(["sample", store.url, "--n", "1000000000", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: ddm sample: argument --n: 1000000000 is more than 4096 samples "
                                               "for one grid (use ddm eval)")
    ensemble = Ensemble.load(store)
    with pytest.raises(SamplerError, match=r"^cfg_scale = Infinity: Input should be a finite number$"):
        ensemble.sample(2, cfg_scale=float("inf"))
    with pytest.raises(SamplerError, match=r"^n = 1,000,000,000: 238.4 GiB of latents; at most 8,388,608 samples"):
        ensemble.sample(10**9)


def test_case9_sampling_runs_in_bounded_chunks_with_the_same_result(digits_store):
    config, store = digits_store
    ensemble = Ensemble.load(store)
    rows: list[int] = []
    hooks = [e.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])) for e in ensemble.experts]
    chunked = ensemble.sample(20, config.sampling, steps=2, seed=3, chunk=8)
    for h in hooks:
        h.remove()
    assert max(rows) <= 2 * 8  # CFG runs the conditional and null halves of a chunk in one batch
    torch.testing.assert_close(chunked, ensemble.sample(20, config.sampling, steps=2, seed=3))


# ---- report: escaped text, files confined -------------------------------------------------------------
def test_case9_report_escapes_run_strings(digits_store, tmp_path):
    from orchestrator.report import write_report

    config, store = digits_store
    evil = config.model_copy(update={"data": config.data.model_copy(update={"source": "<script>alert(1)</script>"})})
    index = write_report(store, evil, tmp_path / "report", run_eval=False)
    page = index.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_case9_report_name_cannot_leave_the_report_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    data = digits_config("memory://untrusted-report").model_dump(mode="json")
    data["name"] = str(outside)  # an absolute name: reports/<name> would be the name itself
    store = RunStore("memory://untrusted-report")
    store.commit("run.json", RunRecord(name=data["name"], config=data, config_fingerprint="0" * 64, code_version="x",
                                       created_at=datetime.now(timezone.utc).isoformat()))
    try:
        assert main(["report", store.url, "--no-eval"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: memory://untrusted-report: run.json does not fit this code version: config: name = ")
        assert "must be a plain name" in err and not outside.exists()
    finally:
        store.delete("run.json")


# ---- FID weights: a state dict the caller names, never code from the run --------------------------------
def test_case9_fid_inception_is_a_tensors_only_state_dict(tmp_path, monkeypatch):
    from worker.evalmath import inception_features
    from worker.evaluate import EvalError, fid_weights
    from worker.models.inception import FEATURE_DIM, FIDInception, load_fid_inception

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception.pth"
    torch.save(FIDInception().state_dict(), weights)
    model = load_fid_inception(str(weights))
    feats = inception_features(model, torch.rand(2, 1, 8, 8))
    assert feats.shape == (2, FEATURE_DIM) and (feats >= 0).all()

    script = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(ValueError, match="not a tensors-only state dict"):
        load_fid_inception(str(script))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module: unpickling would run its code
    with pytest.raises(ValueError, match="not a tensors-only state dict"):
        load_fid_inception(str(pickled))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="not FID Inception-v3 weights"):
        load_fid_inception(str(wrong))

    monkeypatch.setenv("DDM_INCEPTION_WEIGHTS", str(weights))
    assert fid_weights(None) == str(weights)
    monkeypatch.setenv("DDM_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(EvalError, match="missing.pth'?: no such file"):
        fid_weights(None)
    monkeypatch.delenv("DDM_INCEPTION_WEIGHTS")
    assert fid_weights(None) is None
    with pytest.raises(ValueError, match="a run cannot name FID weights"):
        RunConfig.model_validate({"eval": {"inception_path": str(script)}})

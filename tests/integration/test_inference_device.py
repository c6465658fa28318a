"""Inference goes to the GPU when there is one: `Ensemble.load`, distillation (teacher and student), the
gather preview, eval, report and `ddm sample` all default to device "auto"; `--device` overrides it.

On a machine without CUDA, "CUDA is visible" is simulated by making `torch.cuda.is_available` say so: a
model moved to CUDA then fails with the build's own CUDA error, which is what proves where it was sent.
On a machine with CUDA the same entry points must simply run there.
"""

from __future__ import annotations

import socket

import pytest
import torch

from common.storage import RunStore
from orchestrator.cli import main
from tests.integration.ensemble_runs import digits_config, digits_run, random_exports
from worker.ensemble import Ensemble
from worker.gather import gather

REAL_CUDA = torch.cuda.is_available()


@pytest.fixture
def gathered(tmp_path):
    torch.set_num_threads(1)
    url = str(tmp_path / "run")
    config = digits_config(url, K=2)
    config.sampling.steps = 2
    store = RunStore(url)
    digits_run(store, config)
    random_exports(store, config)
    gather(config, store)
    return config, store


def _goes_to_cuda(fn) -> None:
    if REAL_CUDA:
        fn()
        return
    with pytest.raises((AssertionError, RuntimeError), match="CUDA|NVIDIA|cuda"):
        fn()


def test_every_inference_entry_point_uses_cuda_when_visible(gathered, monkeypatch, tmp_path):
    from orchestrator.pipeline import gather_and_preview
    from orchestrator.report import write_report
    from orchestrator.stages import StageRunner
    from worker.distill import DistillConfig, distill
    from worker.evaluate import evaluate

    config, store = gathered
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _goes_to_cuda(lambda: Ensemble.load(store))
    _goes_to_cuda(lambda: distill(config, store, DistillConfig(duration_nimg=32, batch=16)))
    _goes_to_cuda(lambda: gather_and_preview(config, store, StageRunner(store, config)))
    _goes_to_cuda(lambda: evaluate(store, config, num_samples=4, strategies=["top1"]))
    _goes_to_cuda(lambda: write_report(store, config, tmp_path / "report", run_eval=False))
    _goes_to_cuda(lambda: main(["sample", store.url, "--n", "2", "--steps", "1", "--out", str(tmp_path / "a.png")]))
    # --device cpu keeps everything on the CPU even where CUDA is visible.
    assert main(["sample", store.url, "--n", "2", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "b.png")]) == 0
    assert Ensemble.load(store, device="cpu").device == torch.device("cpu")


def test_device_cuda_without_cuda_is_a_usage_error_naming_the_node(gathered, monkeypatch, capsys):
    _, store = gathered
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("sample", "eval", "report", "distill"):
        assert main([command, store.url, "--device", "cuda"]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err == f"error: --device cuda: no CUDA device is visible on node {socket.gethostname()}", err

"""`ddm report` / `ddm eval` / `ddm sample` / `ddm export` / `ddm distill` on a briefly trained digits run."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.stages import StageRunner
from tests.integration.ensemble_runs import digits_config, train_all
from worker.gather import gather
from worker.partition import cluster_data
from worker.prepare import prepare_data

pytestmark = pytest.mark.slow  # the fixture trains two experts and the router for real (~1 min on a quiet core)

TRAIN_NIMG = 16_384     # per expert: recognisable digits (8,192 gave class accuracy 0.21 ± 0.10, 3 seeds x 64)
EVAL_N = 64
CLASS_ACC_FLOOR = 0.25  # chance is 0.1: 3 x 64 samples at chance exceed 0.2 with probability < 1e-5


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    torch.set_num_threads(1)
    url = str(tmp_path_factory.mktemp("digits") / "run")
    c = digits_config(url, K=2).model_dump(mode="json")
    c["training"].update(duration_nimg=TRAIN_NIMG, log_every_nimg=1024, global_batch=128)
    c["router"]["training"].update(duration_nimg=TRAIN_NIMG // 2, log_every_nimg=1024)
    c["sampling"]["steps"] = 8
    from common.config import RunConfig

    config = RunConfig.model_validate(c)
    store = RunStore(url)
    StageRunner(store, config).write_run_record()
    prepare_data(config, store)  # the real stages, so the report shows the cluster stage's own pictures
    cluster_data(config, store)
    train_all(store, config)
    gather(config, store)
    return url


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])


def test_eval_measures_quality_against_the_held_out_split(trained_digits, capsys):
    assert main(["eval", trained_digits, "--json", "--n", str(EVAL_N)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in results["rows"]] == ["top1", "full", "oracle"] and results["seeds"] == [0, 1, 2]
    ref = results["reference"]
    assert ref["against"].startswith("held-out split") and ref["classifier_accuracy_on_target"] > 0.9
    real, noise = ref["fd_real_vs_target"], ref["fd_noise_vs_target"]
    assert real["n"] == EVAL_N and real["mean"] < 0.1 * noise
    for row in results["rows"]:
        assert len(row["per_seed"]["fd"]) == 3 and row["fd_ci95"] is not None and row["gflops_per_sample"] > 0
        # a briefly trained ensemble: far above chance (0.1) and far from noise, not yet at real-data level
        assert row["class_acc"] - row["class_acc_ci95"] > CLASS_ACC_FLOOR, row
        assert row["fd"] + row["fd_ci95"] < 0.5 * noise, row
    by = {r["strategy"]: r["gflops_per_sample"] for r in results["rows"]}
    assert by["full"] > 1.6 * by["top1"]  # full runs both experts; top-1 one (+ the router)
    router = results["router"]
    assert router["t_buckets"][-1] == "0.95-1.00"
    acc = router["variants"]["router p(k | x_t, t)"]["accuracy"]
    assert acc[0] > acc[-1] and acc[0] > 0.7  # clean rows are easy to route; near t = 1 the router is blind
    store = RunStore(trained_digits)
    assert json.loads(store.read_bytes("eval/results.json"))["rows"] == results["rows"]
    md = store.read_bytes("eval/results.md").decode()
    assert "| strategy | gflops_per_sample | fd | class_acc |" in md and " ± " in md
    assert "Real-vs-real reference" in md and "held-out split" in md


def test_status_lists_the_files_that_trained_an_expert(trained_digits, capsys):
    from common.manifests import DatasetManifest, ExpertManifest
    from worker.prepare_shard import heldout_mask

    store = RunStore(trained_digits)
    assert main(["status", trained_digits, "--expert", "1", "--files"]) == 0
    keys = capsys.readouterr().out.split()
    rows = store.read_record("experts/01/manifest.json", ExpertManifest).rows
    assert len(keys) == len(set(keys)) == rows and all(k.startswith("builtin:digits#") for k in keys)
    hold = store.read_record("data/dataset.json", DatasetManifest).extra["holdout"]
    index = np.array([int(k.split("#")[1]) for k in keys])  # builtin keys name the discovery index
    assert not heldout_mask(index, hold["fraction"], hold["seed"]).any()
    assert main(["status", trained_digits, "--files"]) == 2
    assert main(["status", trained_digits, "--expert", "9", "--files"]) == 2


def test_report_renders_and_every_image_exists(trained_digits, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", trained_digits, "--out", str(out)]) == 0
    index = Path(capsys.readouterr().out.strip())
    assert index == out / "index.html"
    page = index.read_text()
    refs = _Refs()
    refs.feed(page)
    assert len(refs.srcs) >= 2 + 2 + 3 + 2  # sizes + thumbnails, curves + router, strategy grids, experts
    for src in refs.srcs:
        assert not re.match(r"^[a-z]+:", src), f"{src}: reports may not reference network or absolute assets"
        assert (out / src).is_file() and (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert not refs.hrefs and "http" not in page.split("</style>")[1]
    for section in ("Run", "Clusters", "Training", "Samples", "Evaluation", "Config used"):
        assert section in page
    # Metric names with units and direction, not raw keys.
    assert "class accuracy, fraction of samples classified as their label (higher is better)" in page
    assert "FD, Fréchet distance of classifier features (lower is better)" in page and "<th>fd</th>" not in page


def test_report_runs_a_quick_evaluation_with_progress(trained_digits, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_digits, run)
    store = RunStore(str(run))
    store.delete("eval")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "report: evaluating 3 strategies x 40 samples (quick; --full for eval.num_samples = 40)" in err
    assert re.search(r"report: \[\s*\d+s\] sampling 40 x \d+ seeds with top1", err), err
    # This run sets eval.num_samples = 40, under QUICK_SAMPLES.
    assert json.loads(store.read_bytes("eval/results.json"))["num_samples"] == 40


def test_sample_export_and_bad_usage(trained_digits, tmp_path, capsys):
    for strategy in ("top1", "topk", "full", "sample", "threshold", "nucleus", "oracle"):
        out = tmp_path / f"{strategy}.png"
        assert main(["sample", trained_digits, "--n", "8", "--steps", "3", "--strategy", strategy, "--cfg", "2",
                     "--out", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["sample", trained_digits, "--n", "4", "--strategy", "single", "--expert", "1", "--class", "3",
                 "--out", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    assert main(["sample", trained_digits, "--class", "11"]) == 2
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert main(["sample", trained_digits, "--strategy", "single"]) == 2
    assert main(["sample", trained_digits, "--student"]) == 2
    assert main(["export", trained_digits, str(tmp_path / "exp")]) == 0
    assert main(["export", trained_digits, str(tmp_path / "exp")]) == 2  # not empty
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(e.startswith("error: ") for e in errors), errors
    assert "classes: label 11: out of range [0, 9]" in errors[0] and "no run.json" in errors[1]
    assert main(["sample", str(tmp_path / "exp"), "--n", "4", "--steps", "2"]) == 2  # a folder has no run.json


def test_distill_student_samples_and_is_evaluated(trained_digits, tmp_path, capsys):
    assert main(["distill", trained_digits, "--nimg", "512", "--batch", "64"]) == 0
    assert main(["sample", trained_digits, "--student", "--n", "8", "--steps", "3",
                 "--out", str(tmp_path / "student.png")]) == 0
    assert (tmp_path / "student.png").is_file()
    capsys.readouterr()
    assert main(["eval", trained_digits, "--json", "--n", "20", "--seeds", "2", "--strategies", "top1"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["strategy"] for r in rows] == ["top1", "student (dense)"]
    assert rows[1]["gflops_per_sample"] < rows[0]["gflops_per_sample"]  # no router

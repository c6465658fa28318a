"""Aspect-ratio buckets through prepare, cluster, the loader and training, in-process (no Ray) on
builtin:shapes drawn at three aspect ratios."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load

from common.buckets import nearest_bucket
from common.manifests import DatasetManifest, ExpertManifest, RouterManifest
from common.presets import shapes
from common.storage import RunStore
from worker.bucket_data import BucketOrder
from worker.checkpoint import load_export
from worker.data import open_partition
from worker.partition import cluster_data
from worker.prepare import prepare_data
from worker.sources import discover
from worker.train import expert_job, job_store, router_job, train

torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP threads only spin
BATCH = 16  # per expert: global batch 64 over K = 4


def _config():
    cfg = shapes()
    cfg.data.gmm_items, cfg.data.shard_rows, cfg.data.captions = 300, 128, False
    cfg.data.shapes_aspect_ratios = [0.5, 1.0, 2.0]
    cfg.data.buckets = {"enabled": True, "max_aspect": 2.5}
    cfg.training.global_batch, cfg.training.total_nimg = 4 * BATCH, 4 * 24 * BATCH
    cfg.training.checkpoint_every_nimg, cfg.training.log_every_nimg, cfg.training.sample_every_nimg = 128, 128, 192
    cfg.router.training.global_batch, cfg.router.training.total_nimg = 32, 8 * 32
    cfg.sampling.steps = 4
    return cfg


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory):
    """A prepared and clustered bucketed run (read-only for the tests; copy it to train)."""
    root = tmp_path_factory.mktemp("bucketed") / "run"
    store = RunStore(str(root))
    prepare_data(_config(), store)
    cluster_data(_config(), store)
    return root


@pytest.fixture
def prepared(prepared_root) -> RunStore:
    return RunStore(str(prepared_root))


def test_prepare_resizes_each_image_to_its_nearest_bucket_and_counts_rows_per_bucket(prepared):
    cfg = _config()
    ds = prepared.read_record("data/dataset.json", DatasetManifest)
    buckets = cfg.bucket_sizes(vae_factor=1)
    assert buckets == [(12, 20), (16, 16), (20, 12)]
    summary = ds.extra["buckets"]
    assert [b["bucket"] for b in summary] == [[12, 20], [16, 16], [20, 12]]
    assert [b["latent_shape"] for b in summary] == [[3, 20, 12], [3, 16, 16], [3, 12, 20]]
    assert sum(b["rows"] for b in summary) == ds.used == 300
    assert all(b["rows"] > 50 for b in summary)
    assert ds.latent_shape == max(summary, key=lambda b: b["rows"])["latent_shape"]

    items = discover(cfg.data, cfg.seed).items
    rows_per_bucket: dict[tuple[int, int], int] = {}
    for ref in ds.shards:  # one shape per shard; each row in the bucket nearest to its source's aspect ratio
        tensors = load(prepared.get_payload(ref))
        w, h = ref.bucket
        assert tuple(tensors["latents"].shape[1:]) == (3, h, w), ref.path
        assert ref.path.endswith(f"-{w}x{h}.safetensors")
        assert tensors["features"].shape[1:] == (32,)  # one fixed-size vector per image: k-means is unchanged
        for i in tensors["index"].tolist():
            _, ih, iw = items[i].array.shape
            assert nearest_bucket(iw, ih, buckets) == (w, h)
        rows_per_bucket[(w, h)] = rows_per_bucket.get((w, h), 0) + ref.rows
    assert [rows_per_bucket[tuple(b["bucket"])] for b in summary] == [b["rows"] for b in summary]


def test_partitions_keep_buckets_and_the_loader_never_mixes_shapes(prepared):
    manifest = prepared.read_record("experts/00/manifest.json", ExpertManifest)
    assert {s.bucket for s in manifest.shards} == {(12, 20), (16, 16), (20, 12)}
    router = prepared.read_record("router/manifest.json", RouterManifest)
    assert all(s.bucket is not None for s in router.shards)

    part = open_partition(prepared, "experts/00/manifest.json", "expert", window_rows=16)
    order = BucketOrder([s.bucket for s in part.shards], [s.rows for s in part.shards], 7, 16, BATCH)
    steps = 3 * order.steps  # three epochs
    seen = []
    for n, batch in enumerate(part.stream(0, steps * BATCH, BATCH, torch.arange(BATCH), torch.device("cpu"), seed=7)):
        j, _ = order.step(n * BATCH)
        w, h = order.buckets[j]
        assert batch["x0"].shape == (BATCH, 3, h, w) and batch["labels"].shape == (BATCH,)
        seen.append(j)
    # every bucket is visited ceil(rows / batch) times per epoch
    per_epoch = [-(-n // BATCH) for n in order.rows]
    assert [seen.count(j) for j in range(3)] == [3 * c for c in per_epoch]
    assert part.stats["peak_resident_rows"] <= 3 * 2 * (16 + max(s.rows for s in part.shards))


def test_every_row_of_a_bucket_is_visited_each_epoch():
    order = BucketOrder([(8, 4)] * 3 + [(4, 8)] * 2, [30, 25, 7, 40, 1], seed=3, window_rows=20, batch=8)
    for epoch in range(3):
        visits: dict[int, list[int]] = {0: [], 1: []}
        for s in range(order.steps):
            j, segments = order.step((epoch * order.steps + s) * 8)
            starts = order.orders[j].windows(epoch)[1]
            for e, w, _, rows in segments:
                assert e == epoch
                visits[j] += (rows + starts[w]).tolist()
        for j, n in enumerate(order.rows):
            assert sorted(set(visits[j])) == list(range(n))          # none skipped
            assert len(visits[j]) == -(-n // 8) * 8                   # the last batch filled up from the start


def test_bucket_choice_follows_the_rows_left_in_the_epoch():
    batch = 10
    order = BucketOrder([(8, 4), (4, 4), (4, 8)], [1000, 300, 50], seed=11, window_rows=10_000, batch=batch)
    rows = order.rows  # in bucket order: tallest first
    assert rows == [50, 300, 1000]
    epochs = 400
    first = np.zeros(3)
    surprise, variance = np.zeros(3), np.zeros(3)
    for epoch in range(epochs):
        left = np.array(rows, dtype=float)
        for s, (j, _) in enumerate(order.schedule(epoch)):
            p = left / left.sum()
            if s == 0:
                first[j] += 1
            chosen = np.eye(3)[j]
            surprise += chosen - p          # sums to ~0 when each draw follows the rows left
            variance += p * (1 - p)
            left[j] -= min(batch, left[j])
    z = surprise / np.sqrt(variance)
    assert np.all(np.abs(z) < 4), z
    # the first step of an epoch: probability rows / total (a uniform choice would give 1/3 each)
    expected = np.array(rows) / sum(rows)
    assert np.all(np.abs(first / epochs - expected) < 4 * np.sqrt(expected * (1 - expected) / epochs)), first


def test_order_is_a_pure_function_of_seed_and_nimg():
    a = BucketOrder([(8, 4), (4, 8)], [50, 20], seed=5, window_rows=16, batch=8)
    b = BucketOrder([(8, 4), (4, 8)], [50, 20], seed=5, window_rows=16, batch=8)
    for nimg in [8 * 40, 0, 8 * 3, 8 * 17]:  # any order of queries, a fresh object: the same answer
        ja, sa = a.step(nimg)
        jb, sb = b.step(nimg)
        assert ja == jb and all(x[:2] == y[:2] and torch.equal(x[3], y[3]) for x, y in zip(sa, sb))
    with pytest.raises(ValueError, match="not a multiple of the batch 8"):
        a.step(4)


def test_token_counts_follow_the_bucket_of_every_step():
    order = BucketOrder([(8, 4), (4, 8), (8, 8)], [50, 20, 30], seed=5, window_rows=16, batch=8)
    cost = [2, 2, 4]  # tokens per image of each bucket, in order.buckets' order
    steps = [8 * cost[order.step(8 * g)[0]] for g in range(40)]  # across epoch boundaries (13 steps each)
    assert [order.tokens_before(8 * g, cost) for g in (0, 1, 13, 40)] == [0, steps[0], sum(steps[:13]), sum(steps)]
    for budget in (1, steps[0], steps[0] + 1, sum(steps[:27]) - 1, sum(steps[:27])):
        nimg = order.nimg_for_tokens(budget, cost)  # the first step boundary holding the budget
        assert order.tokens_before(nimg, cost) >= budget > order.tokens_before(nimg - 8, cost), budget


def test_a_token_budget_gives_every_expert_the_same_tokens_not_images(prepared_root, tmp_path):
    """budget_unit = tokens: each expert trains to the first step at which it has seen the tokens of its
    image budget at the 16x16 square, whatever mix of 15- and 16-token buckets its partition holds; the log
    rows and the export report both images and tokens, and a resumed job counts tokens exactly."""
    cfg = _config()
    cfg.training.budget_unit = "tokens"
    store = RunStore(str(shutil.copytree(prepared_root, tmp_path / "run")))
    short = 20 * BATCH  # per-expert images at 16 tokens each
    budget, seen = 16 * short, {}
    for k in range(cfg.clustering.num_experts):
        job = expert_job(cfg, k, cfg.islands.pool[0]).model_copy(update={"duration_tokens": 16 * short})
        assert expert_job(cfg, k, cfg.islands.pool[0]).duration_tokens == 16 * cfg.expert_nimg
        export = train(job, job_store(store, job))
        rows = [json.loads(line) for line in store.read_bytes(f"experts/{k:02d}/metrics.jsonl").decode().splitlines()]
        tokens, nimg = rows[-1]["tokens"], rows[-1]["nimg"]
        assert export.nimg == nimg and budget <= tokens < budget + 16 * BATCH, (k, tokens)
        seen[k] = (nimg, tokens)
    # every partition holds 15-token rows (12x20, 20x12), so each expert needs more images than 20 steps give
    assert all(nimg > short for nimg, _ in seen.values()), seen
    job = expert_job(cfg, 0, cfg.islands.pool[0]).model_copy(update={"duration_tokens": 2 * budget})
    train(job, job_store(store, job))  # resumes at experts/00's export, counting its tokens from the data order
    rows = [json.loads(line) for line in store.read_bytes("experts/00/metrics.jsonl").decode().splitlines()]
    straight = RunStore(str(shutil.copytree(prepared_root, tmp_path / "straight")))
    train(job, job_store(straight, job))
    again = [json.loads(line) for line in straight.read_bytes("experts/00/metrics.jsonl").decode().splitlines()]
    assert (rows[-1]["nimg"], rows[-1]["tokens"]) == (again[-1]["nimg"], again[-1]["tokens"])
    assert 2 * budget <= rows[-1]["tokens"] < 2 * budget + 16 * BATCH
    from common.manifests import RunRecord
    from orchestrator.status import collect_status, format_status

    store.commit("run.json", RunRecord(name="b", config={}, config_fingerprint="f", code_version="x", created_at="now"))
    text = format_status(collect_status(store))  # images and tokens side by side
    assert "tokens seen" in text and f"{rows[-1]['nimg']:,}" in text and f"{rows[-1]['tokens']:,}" in text


def test_bucketed_training_resumes_bit_exactly(prepared_root, tmp_path):
    """In-process mirror of the SIGKILL test with buckets on: stop mid-run, resume, compare with a straight run."""
    cfg = _config()
    straight, stopped = (RunStore(str(shutil.copytree(prepared_root, tmp_path / d))) for d in ("straight", "stopped"))
    job = expert_job(cfg, 0, cfg.islands.pool[0])
    assert job.batch == BATCH
    train(job, job_store(straight, job))
    half = job.model_copy(update={"training": job.training.model_copy(update={"duration_nimg": 12 * BATCH})})
    train(half, job_store(stopped, half))
    stopped.delete("experts/00/export.json")
    train(job, job_store(stopped, job))
    a, b = load_export(straight, "experts/00")[0], load_export(stopped, "experts/00")[0]
    assert math.isfinite(sum(p.abs().sum().item() for p in a.parameters()))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    # the exported DiT runs at every bucket's grid
    for h, w in [(20, 12), (16, 16), (12, 20)]:
        out = a(torch.zeros(2, 3, h, w), torch.full((2,), 0.5), torch.tensor([0, 1]))
        assert out.shape == (2, 3, h, w)


def test_the_router_trains_on_bucketed_batches(prepared_root, tmp_path):
    cfg = _config()
    store = RunStore(str(shutil.copytree(prepared_root, tmp_path / "router")))
    job = router_job(cfg, cfg.islands.pool[0])
    record = train(job, job_store(store, job))
    assert record.nimg == cfg.router.training.total_nimg


def test_status_shows_rows_per_bucket_and_expert_files_trace_bucketed_rows(prepared_root, tmp_path):
    from common.manifests import RunRecord
    from orchestrator.status import collect_status, expert_files, format_status

    store = RunStore(str(shutil.copytree(prepared_root, tmp_path / "status")))
    store.commit("run.json", RunRecord(name="b", config={}, config_fingerprint="f", code_version="x", created_at="now"))
    ds = store.read_record("data/dataset.json", DatasetManifest)
    status = collect_status(store)
    assert status["buckets"] == ds.extra["buckets"]
    text = format_status(status)
    for b in ds.extra["buckets"]:
        assert f"{b['bucket'][0]}x{b['bucket'][1]}" in text and f"{b['rows']:>10,}" in text
    manifest = store.read_record("experts/01/manifest.json", ExpertManifest)
    files = expert_files(store, 1)
    assert len(files) == manifest.rows and all(f.startswith("builtin:shapes#") for f in files)
    index = sorted(i for ref in manifest.shards for i in load(store.get_payload(ref))["index"].tolist())
    assert sorted(int(f.split("#")[1]) for f in files) == index


def test_config_show_reports_images_and_tokens_per_bucket():
    from worker.budget import format_budget, training_budget

    budget = training_budget(_config())
    # shapes: patch 4 on 16x16 pixels = 16 tokens; buckets 12x20 and 20x12 = 3 x 5 = 15 tokens
    assert budget["tokens_per_image"] == 16
    assert budget["experts_total_tokens"] == 16 * budget["experts_total_nimg"]
    assert [(c["bucket"], c["tokens"]) for c in budget["buckets"]] == [([12, 20], 15), ([16, 16], 16), ([20, 12], 15)]
    assert budget["buckets"][0]["train_flops_per_image"] < budget["buckets"][1]["train_flops_per_image"]
    text = format_budget(budget)
    assert "15 to 16 tokens per image" in text and f"{15 * budget['experts_total_nimg']:,} to" in text
    tokens = _config()
    tokens.training.budget_unit = "tokens"
    assert f"per expert: {16 * tokens.expert_nimg:,} tokens (budget_unit = tokens" in format_budget(training_budget(tokens))
    from common.presets import laion_xl2

    laion = laion_xl2()  # the paper's text-to-image shape: captions + CLIP, buckets, token budgets
    assert laion.data.buckets.enabled and laion.data.captions and laion.text.encoder == "clip"
    assert laion.training.budget_unit == laion.router.training.budget_unit == "tokens"
    assert "tokens whatever the buckets" in format_budget(training_budget(laion))
    square = _config()
    square.data.buckets = {"enabled": False}
    assert training_budget(square)["buckets"] == [] and "buckets" not in format_budget(training_budget(square))


def test_whole_partition_readers_refuse_bucketed_rows_in_one_line(prepared):
    from common.errors import UsageError
    from worker.data import load_partition
    from worker.evaluate import training_split

    with pytest.raises(UsageError, match=r"^experts/00/manifest.json: rows in 3 aspect-ratio buckets") as err:
        load_partition(prepared, "experts/00/manifest.json", "expert")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"^the dataset holds 3 aspect-ratio buckets .data.buckets.: these rows"):
        training_split(prepared, prepared.read_record("data/dataset.json", DatasetManifest))
    part = open_partition(prepared, "experts/00/manifest.json", "expert")
    assert part.largest_latent_shape() == [3, 16, 16]  # 16x16 = 256 pixels beats 12x20 = 240


@pytest.fixture(scope="module")
def gathered_root(prepared_root, tmp_path_factory):
    """The bucketed run with briefly trained experts and router, gathered into an ensemble."""
    from orchestrator.stages import StageRunner
    from worker.gather import gather

    cfg = _config()
    root = shutil.copytree(prepared_root, tmp_path_factory.mktemp("gathered") / "run")
    store = RunStore(str(root))
    StageRunner(store, cfg.model_copy(update={"run_uri": str(root)})).write_run_record()  # what `ddm eval` opens
    for k in range(cfg.clustering.num_experts):
        job = expert_job(cfg, k, cfg.islands.pool[0])
        train(job.model_copy(update={"training": job.training.model_copy(update={"duration_nimg": 4 * BATCH})}),
              job_store(store, job))
    train(router_job(cfg, cfg.islands.pool[0]), job_store(store, router_job(cfg, cfg.islands.pool[0])))
    gather(cfg, store)
    return root


def test_a_bucketed_ensemble_samples_at_non_square_bucket_shapes(gathered_root):
    from orchestrator.cmd_results import latent_size
    from worker.ensemble import Ensemble

    cfg = _config()
    ensemble = Ensemble.load(RunStore(str(gathered_root)))
    assert ensemble.manifest.latents["pixel_factor"] == 1
    for width, height in [(12, 20), (20, 12)]:  # ddm sample --size WxH on a run whose latent shape is a bucket's
        size = latent_size((width, height), ensemble, cfg)
        assert size == (height, width)
        x = ensemble.sample(2, "top1", steps=2, classes=[0, 1], size=size)
        assert x.shape == (2, 3, height, width) and torch.isfinite(x).all()


def test_ddm_eval_judges_a_bucketed_run_per_shape_and_compares_another_run(gathered_root, tmp_path, capsys):
    """Class accuracy at every bucket shape under a classifier that takes any shape; the classifier itself reads
    the real held-out rows of each shape correctly, and a compared run is sampled at the same shapes."""
    from orchestrator.cli import main
    from orchestrator.report import _eval
    from worker.eval_buckets import floor_verdict

    run = shutil.copytree(gathered_root, tmp_path / "run")
    other = shutil.copytree(gathered_root, tmp_path / "other")
    assert main(["eval", str(run), "--json", "--n", "30", "--seeds", "2", "--compare", f"same={other}"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["bucket"] for r in res["shapes"]] == ["12x20", "16x16", "20x12"]
    assert res["chance_class_acc"] == 0.25
    for r in res["shapes"]:
        assert r["heldout_rows"] >= 5 and r["real_heldout_acc"] >= 0.8, r  # shapes are easy: the judge works
        mine, same = r["models"]["this run"], r["models"]["same"]
        assert len(mine["per_seed"]) == 2 and mine["class_acc_ci95"] is not None
        assert mine == same  # the same weights, seeds and shape give the same samples and the same verdicts
        assert r["floor"] == pytest.approx(0.25 + (r["real_heldout_acc"] - 0.25) / 2, abs=1e-4)
        assert mine["floor_verdict"] == floor_verdict(mine, r["floor"])
        low, high = mine["pooled_wilson95"]  # all 60 samples pooled: an interval even when both seeds agree
        assert low <= mine["class_acc"] <= high and high - low > 0.05
    assert main(["eval", str(run), "--n", "8", "--seeds", "2"]) == 0
    table = capsys.readouterr().out
    assert "| shape (WxH px) | held-out rows | real held-out | floor | this run |" in table and "| 20x12 |" in table
    page = _eval(RunStore(str(run)), _config(), run_eval=False, allow_external_models=False, device=torch.device("cpu"))
    assert "real held-out acc." in page and "20x12" in page
    assert main(["eval", str(run), "--compare", "nameless"]) == 2
    assert "--compare 'nameless': expected NAME=RUN" in capsys.readouterr().err


def test_unbucketed_records_serialise_as_before_and_a_bad_bucket_is_refused():
    from pydantic import ValidationError

    from common.manifests import PreparedShard, ShardRef

    ref = ShardRef(path="data/shards/00000.safetensors", sha256="0" * 64, size=1, rows=2)
    assert ref.model_dump_json() == ('{"path":"data/shards/00000.safetensors","sha256":"' + "0" * 64 +
                                     '","size":1,"rows":2}')
    assert "bucket_data" not in PreparedShard(shard=0, plan="p", start=0, stop=1).model_dump_json()
    bucketed = ShardRef(path="data/shards/00000-8x4.safetensors", sha256="0" * 64, size=1, rows=2, bucket=(8, 4))
    assert ShardRef.model_validate_json(bucketed.model_dump_json()) == bucketed
    with pytest.raises(ValidationError, match="bucket"):
        ShardRef(path="x", sha256="0" * 64, size=1, rows=2, bucket=(0, 4))


def _png(path, width: int, height: int, colour: tuple[int, int, int]) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (10, 10, 10))
    ImageDraw.Draw(img).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=colour)
    img.save(path)


def test_files_are_bucketed_deduplicated_and_resumed(tmp_path):
    """Real PNG files of three aspect ratios: bucket per file, a duplicate in a later range rewritten out of its
    bucket shard, and a prepare stopped after some parts resumes to the same dataset."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(64, 32), (32, 64), (48, 48)] * 4
    for i, (w, h) in enumerate(sizes):
        _png(folder / f"{i:02d}.png", w, h, (40 + 15 * i, 200 - 10 * i, 90))
    (folder / "12.png").write_bytes((folder / "00.png").read_bytes())  # listed after 00.png: the duplicate
    cfg = _config()
    cfg.data.source, cfg.data.label_source, cfg.data.shard_rows = str(folder), "none", 4
    cfg.data.holdout_fraction, cfg.features.pca_dim = 0.0, None
    store = RunStore(str(tmp_path / "run"))
    result = prepare_data(cfg, store)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert result.counts["quarantined"] == 1 and ds.used == 12
    assert {tuple(b["bucket"]): b["rows"] for b in ds.extra["buckets"]} == {(12, 20): 4, (16, 16): 4, (20, 12): 4}
    assert [s.path for s in ds.shards if "dedup" in s.path] == []  # 12.png is alone in its bucket shard of range 3
    assert not any(s.path.startswith("data/shards/00003-20x12") for s in ds.shards)
    for ref in ds.shards:
        w, h = ref.bucket
        assert load(store.get_payload(ref))["latents"].shape[1:] == (3, h, w)

    # the duplicate sharing a bucket shard with other rows: that shard is rewritten as <i>-<W>x<H>-dedup
    (folder / "13.png").write_bytes((folder / "01.png").read_bytes())
    _png(folder / "14.png", 66, 33, (1, 2, 3))
    again = prepare_data(cfg, store)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert again.counts["quarantined"] == 2 and ds.used == 13
    assert [s.path for s in ds.shards if "dedup" in s.path] == ["data/shards/00003-20x12-dedup.safetensors"]
    dedup = next(s for s in ds.shards if "dedup" in s.path)
    assert dedup.rows == 1 and dedup.bucket == (20, 12)

    # resume: drop the dataset record and one part; the rest are kept, the dataset comes out the same
    store.delete("data/parts/00001.json")
    store.delete("data/dataset.json")
    resumed = prepare_data(cfg, store)
    assert resumed.details["resumed_shards"] == 3
    assert store.read_record("data/dataset.json", DatasetManifest).shards == ds.shards


def test_vae_dinov2_and_clip_prepare_per_bucket_and_a_text_expert_trains(tiny_models, tmp_path):
    """Latent space (a VAE of factor 2): buckets are multiples of 2 x patch 2 pixels; captions and CLIP tokens
    stay aligned with their rows inside each bucket shard; a text-conditional expert trains on the buckets."""
    from common.config import RunConfig
    from worker.encoders import ClipText

    cfg = RunConfig.model_validate({
        "data": {"source": "builtin:shapes", "image_size": 16, "channels": 3, "captions": True, "gmm_items": 48,
                 "shard_rows": 16, "holdout_fraction": 0.0, "shapes_aspect_ratios": [0.5, 2.0],
                 "buckets": {"enabled": True, "max_aspect": 2.5}},
        "features": {"extractor": "dinov2", "model": str(tiny_models / "dino")},
        "latents": {"encoder": "vae", "model": str(tiny_models / "sd"), "subfolder": "vae"},
        "text": {"encoder": "clip", "model": str(tiny_models / "clip"), "max_length": 8},
        "model": {"size": "tiny", "patch_size": 2, "conditioning": "text"},
        "clustering": {"num_experts": 1}, "training": {"global_batch": 8, "total_nimg": 32, "log_every_nimg": 16}})
    store = RunStore(str(tmp_path / "run"))
    prepare_data(cfg, store)
    ds = store.read_record("data/dataset.json", DatasetManifest)
    assert {tuple(b["bucket"]): b["latent_shape"] for b in ds.extra["buckets"]} == {(12, 20): [4, 10, 6],
                                                                                    (20, 12): [4, 6, 10]}
    captions = {}
    for ref in ds.extra["captions"]:
        for line in store.read_bytes(ref["path"]).decode().splitlines():
            row = json.loads(line)
            captions[row["index"]] = row["caption"]
    items = discover(cfg.data, cfg.seed).items
    clip = ClipText(str(tiny_models / "clip"), 8, torch.device("cpu"))
    for ref in ds.shards:
        tensors = load(store.get_payload(ref))
        w, h = ref.bucket
        assert tensors["latents"].shape[1:] == (4, h // 2, w // 2) and tensors["features"].shape[1:] == (32,)
        assert tensors["text_tokens"].shape[:2] == (ref.rows, 8)
        assert [captions[i] for i in tensors["index"].tolist()] == [items[i].text for i in tensors["index"].tolist()]
        _, tokens = clip([items[i].text for i in tensors["index"].tolist()])  # each row's own caption's tokens
        assert torch.allclose(tensors["text_tokens"].float(), tokens.float(), atol=1e-5)
    cluster_data(cfg, store)
    job = expert_job(cfg, 0, cfg.islands.pool[0])
    assert train(job, job_store(store, job)).nimg == 32


def test_the_ray_data_map_functions_carry_buckets(tmp_path):
    """decode_batch and ShardEncoder.__call__ as Ray Data calls them (pickled rows, fn_kwargs), in-process."""
    import pickle

    from common.manifests import PreparedShard
    from worker.prepare import run_buckets
    from worker.prepare_decode import decode_batch
    from worker.prepare_shard import ShardEncoder

    cfg = _config()
    found = discover(cfg.data, cfg.seed)
    buckets = run_buckets(cfg)
    rows = {"shard": np.array([0, 1]), "start": np.array([0, 4]),
            "items": np.array([pickle.dumps(found.items[0:4]), pickle.dumps(found.items[4:8])], dtype=object)}
    decoded = decode_batch(rows, fs=found.fs, data=cfg.data, buckets=buckets)
    store = RunStore(str(tmp_path / "run"))
    encoder = ShardEncoder(store, "plan", cfg.seed, cfg.data, cfg.features, cfg.latents, cfg.text, None)
    records = [PreparedShard.model_validate_json(r) for r in encoder(decoded)["record"]]
    for record in records:
        assert record.data is None and sum(r.rows for r in record.bucket_data) == 4
        for ref in record.bucket_data:
            w, h = ref.bucket
            assert load(store.get_payload(ref))["latents"].shape == (ref.rows, 3, h, w)

"""`ddm report`: one static HTML file plus PNGs (no server, no network assets) from a run store.

Sections: the run (per-stage timing, the config used), cluster sizes and thumbnails, per-job loss
curves from every row of each metrics.jsonl, router accuracy by t, sample grids per expert and per
ensemble strategy, and the evaluation table with each metric's unit and direction. When no evaluation
is committed, a quick one runs (QUICK_SAMPLES per strategy; `full=True` uses eval.num_samples),
reporting its progress. Rendering only: every number comes from the run store or from the worker's
sampler and evaluator.
"""

from __future__ import annotations

import html
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

from common.keys import ROUTER, STUDENT, expert_prefix

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.config import RunConfig, to_yaml  # noqa: E402
from common.manifests import ClusterManifest, EnsembleManifest, StageRecord  # noqa: E402
from common.storage import RunStore  # noqa: E402
from orchestrator.stages import STAGES  # noqa: E402

GRID_N = 32
QUICK_SAMPLES = 128  # per strategy in the report's own evaluation; `ddm eval` / --full use eval.num_samples
# Evaluation columns: what each number is, its unit, and which way is better.
METRICS = {
    "fd": "FD, Fréchet distance of classifier features (lower is better)",
    "fid": "FID, Fréchet Inception distance (lower is better)",
    "class_acc": "class accuracy, fraction of samples classified as their label (higher is better)",
    "gflops_per_sample": "GFLOPs per sample, whole sampling chain (lower is cheaper)",
    "sliced_w2": "sliced Wasserstein-2 to the true mixture (lower is better)",
    "mmd2": "MMD², RBF kernel, to the true mixture (lower is better)",
    "mean_loglik": "mean log-likelihood under the true mixture, nats (higher is better)",
    "mode_coverage": "mode coverage, fraction of mixture components hit (higher is better)",
    "router_tv": "router total variation to p(k | x_t, t) (lower is better)",
    "router_top1_agree": "router top-1 agreement with p(k | x_t, t), fraction (higher is better)",
    "velocity_rel_err_full": "velocity relative error, full ensemble, E‖v−u‖²/E‖u‖² (lower is better)",
    "velocity_rel_err_top1": "velocity relative error, top-1 routing (lower is better)",
}


def _say(text: str) -> None:
    print(f"report: {text}", file=sys.stderr, flush=True)


def _label(key: str) -> str:
    return METRICS.get(key, key)


def _jsonl(store: RunStore, key: str) -> list[dict]:
    if not store.exists(key):
        return []
    return [json.loads(line) for line in store.read_bytes(key).decode().splitlines() if line.strip()]


def _file(out: Path, name: str) -> Path:
    """`out / name` for a plain file name only: nothing a run store holds can write outside the report."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"report file name {name!r}: must be a plain name inside {out}")
    return out / name


def _img(name: str, caption: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _clusters(store: RunStore, out: Path) -> str:
    """The cluster stage's own committed pictures (size histogram, thumbnail grids), checksums verified:
    nothing here re-reads the dataset, so the report costs the same for digits and for ImageNet."""
    manifest = store.read_record("clusters/clusters.json", ClusterManifest)
    if manifest is None:
        return "<p>No committed clusters/clusters.json.</p>"
    parts = []
    for ref in manifest.images:
        name = Path(ref.path).name
        _file(out, name).write_bytes(store.get_payload(ref))
        k = name.removeprefix("cluster_").removesuffix(".png")
        if name.startswith("cluster_") and k.isdigit() and int(k) < len(manifest.sizes):
            parts.append(_img(name, f"cluster {k}: {manifest.sizes[int(k)]:,} rows"))
        else:
            parts.insert(0, _img(name, f"cluster sizes ({manifest.method}, {manifest.metric}, K = {manifest.num_experts})"))
    return "".join(parts) or f"<p>Cluster sizes: {html.escape(str(manifest.sizes))} (the cluster stage recorded no pictures).</p>"


def _curves(store: RunStore, out: Path, K: int) -> str:
    jobs = [expert_prefix(k) for k in range(K)] + [ROUTER, STUDENT]
    fig, ax = plt.subplots(figsize=(6, 3))
    drawn = 0
    for prefix in jobs:
        # Every logged row; a resumed job logs again from its checkpoint, and its later rows win.
        by_nimg = {r["nimg"]: r["loss"] for r in _jsonl(store, f"{prefix}/metrics.jsonl") if "loss" in r}
        if by_nimg:
            nimg = sorted(by_nimg)
            ax.plot(nimg, [by_nimg[n] for n in nimg], label=f"{prefix} ({len(nimg)} points)",
                    marker="." if len(nimg) < 50 else None, linewidth=1)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return "<p>No metrics.jsonl found.</p>"
    ax.set_xlabel("images seen")
    ax.set_ylabel("loss (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
    return _img("loss_curves.png", "training loss per job (experts: flow matching, router: cross-entropy)")


def _router(store: RunStore, out: Path) -> str:
    rows = _jsonl(store, "router/metrics.jsonl")
    acc = {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("acc_t")}
    if not acc:
        return "<p>No router accuracy recorded.</p>"
    fig, ax = plt.subplots(figsize=(5, 2.5))
    labels = [k.removeprefix("acc_t") for k in acc]
    ax.bar(labels, list(acc.values()), color="#228833")
    ax.set_ylim(0, 1)
    ax.set_xlabel("t bucket")
    ax.set_ylabel("top-1 accuracy")
    fig.tight_layout()
    fig.savefig(out / "router_accuracy.png", dpi=100)
    plt.close(fig)
    ece = rows[-1].get("ece")
    note = f" (at {rows[-1]['nimg']:,} images; ECE {ece:.3f})" if ece is not None else ""
    return _img("router_accuracy.png", "router accuracy by t: low t is easy (clean image), t -> 1 is chance" + note)


def _grids(store: RunStore, config: RunConfig, out: Path, ensemble) -> str:
    from worker.distill import load_student
    from worker.sampler import save_grid

    s = config.sampling  # passed whole: every setting (threshold, nucleus_p, ...) reaches every grid
    classes = ensemble.classes_for(GRID_N, None)
    labels = None if classes is None else [str(int(c)) for c in classes]
    parts = ["<h3>Ensemble</h3>"]
    for strategy in dict.fromkeys(["top1", *config.eval.strategies]):
        x = ensemble.sample(GRID_N, s, strategy=strategy, seed=config.seed)
        save_grid(ensemble, x, _file(out, f"ensemble_{strategy}.png"), labels=labels, title=strategy)
        parts.append(_img(f"ensemble_{strategy}.png", f"ensemble, {strategy}"))
    student = load_student(store, ensemble.allow_external_models, device=ensemble.device)
    if student is not None:
        x = student.sample(GRID_N, s, strategy="top1", seed=config.seed)
        save_grid(student, x, _file(out, "student.png"), labels=labels, title="student")
        parts.append(_img("student.png", "distilled dense student"))
    parts.append("<h3>Each expert alone</h3>")
    for k in ensemble.present_ids:
        x = ensemble.sample(16, s, strategy="single", expert=k, seed=config.seed)
        save_grid(ensemble, x, _file(out, f"expert_{k:02d}.png"), labels=labels[:16] if labels else None, title=f"expert {k}")
        parts.append(_img(f"expert_{k:02d}.png", f"expert {k} on every class"))
    return "".join(parts)


def _eval(store: RunStore, config: RunConfig, run_eval: bool, allow_external_models: bool,
          device: torch.device, full: bool = False, say: Callable[[str], None] = _say) -> str:
    if not store.exists("eval/results.json") and run_eval:
        from worker.evaluate import evaluate

        n = config.eval.num_samples if full else min(QUICK_SAMPLES, config.eval.num_samples)
        say(f"evaluating {len(config.eval.strategies)} strategies x {n} samples"
            f"{'' if full else ' (quick; --full for eval.num_samples = ' + str(config.eval.num_samples) + ')'}")
        t0 = time.perf_counter()
        evaluate(store, config, num_samples=n, allow_external_models=allow_external_models, device=device,
                 log=lambda m: say(f"[{time.perf_counter() - t0:5.0f}s] {m}"))
    if not store.exists("eval/results.json"):
        return "<p>Not evaluated (run <code>ddm eval</code>).</p>"
    results = json.loads(store.read_bytes("eval/results.json"))
    if "shapes" in results:  # a bucketed run: class accuracy per bucket shape (worker/eval_buckets.py)
        from worker.eval_buckets import accuracy_cell

        names = list(results["shapes"][0]["models"]) if results["shapes"] else []
        cells = [[r["bucket"], r["heldout_rows"], r["real_heldout_acc"], r.get("floor", "")]
                 + [accuracy_cell(m) for m in r["models"].values()] for r in results["shapes"]]
        return (_table(cells, ["shape (WxH px)", "held-out rows", "real held-out acc.", "floor"]
                       + [f"{n} class acc." for n in names])
                + f"<p>{html.escape(results['reference'])}; chance {results['chance_class_acc']}; "
                  f"floor: {html.escape(results.get('floor', 'none recorded'))}</p>")
    from worker.evaltable import metric_table, reference_lines

    header, cells = metric_table(results)  # mean ± 95% interval over the sampling seeds
    parts = [_table(cells, [_label(k) for k in header])]  # names with units and direction
    parts += [f"<p>{html.escape(line)}</p>" for line in reference_lines(results)]
    fields = results.get("gmm_fields")
    if fields:
        fk = [k for k in fields if k != "t"]
        parts.append("<p>GMM: router and ensemble velocity against the closed forms, per t</p>")
        parts.append(_table([[t] + [fields[k][i] for k in fk] for i, t in enumerate(fields["t"])],
                            ["t"] + [_label(k) for k in fk]))
    parts += [f"<p>{html.escape(str(n))}</p>" for n in results.get("notes", [])]
    return "".join(parts)


def _run_info(store: RunStore, config: RunConfig) -> str:
    """Per-stage timing from the committed stage records, and the resolved config the run used."""
    rows = []
    for name in STAGES:
        record = store.read_record(f"stages/{name}.json", StageRecord) if store.exists(f"stages/{name}.json") else None
        if record is not None:
            counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in record.counts.items())
            rows.append([name, f"{record.duration_s:.1f}", record.finished_at, counts])
    parts = [_table(rows, ["stage", "duration (s)", "finished", "counts"]) if rows else "<p>No committed stages.</p>"]
    if rows:
        parts.append(f"<p>Total of committed stages: {sum(float(r[1]) for r in rows):.1f} s.</p>")
    parts.append("<details><summary>Config used</summary><pre>" + html.escape(to_yaml(config)) + "</pre></details>")
    return "".join(parts)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:12px;color:#555}
img{image-rendering:pixelated;border:1px solid #ddd}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}"""


def write_report(store: RunStore, config: RunConfig, out: Path, run_eval: bool = True,
                 allow_external_models: bool = False, device: str | torch.device = "auto", full: bool = False) -> Path:
    """Render the report into `out` (every file it writes is a plain name inside it), sampling on `device`
    ("auto": CUDA when visible); `full` evaluates with eval.num_samples. Returns index.html."""
    from worker.ensemble import Ensemble

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ensemble = Ensemble.load(store, device=device, allow_external_models=allow_external_models)
        return _render(store, config, out, run_eval, ensemble, full)


def _render(store: RunStore, config: RunConfig, out: Path, run_eval: bool, ensemble, full: bool = False) -> Path:
    manifest: EnsembleManifest = ensemble.manifest
    missing = f"; missing experts {manifest.missing}" if manifest.missing else ""
    summary = (f"{store.url}: {config.data.source}, K = {manifest.num_experts}{missing}, model "
               f"{config.model.size}/{config.model.patch_size}, {config.expert_nimg:,} images per expert.")
    body = [  # every string from the run store is escaped: a source name or a note is text, never markup
        f"<h1>DDM run {html.escape(config.name)}</h1>",
        f"<p>{html.escape(summary)}</p>",
        "<h2>Run</h2>", _run_info(store, config),
        "<h2>Clusters</h2>", _clusters(store, out),
        "<h2>Training</h2>", _curves(store, out, manifest.num_experts), _router(store, out),
    ]
    _say("sampling the grids (ensemble strategies, each expert)")
    body += ["<h2>Samples</h2>", _grids(store, config, out, ensemble),
             "<h2>Evaluation</h2>", _eval(store, config, run_eval, ensemble.allow_external_models, ensemble.device, full)]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>DDM {html.escape(config.name)}</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index

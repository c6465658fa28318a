"""Paper Tables 1 and 2 at our scale on digits, as artefacts: one JSON per row, tables with intervals, plots.

Table 1 (inference strategies, paper Table 1): the monolith (K = 1) and one K = 4 run with top-1, top-2,
full, sample and oracle routing, plus the dense student distilled from it.
Table 2 (number of experts, paper Table 2): K = 4, 8, 16 (and the K = 1 monolith) at the SAME training
budget: `training.total_nimg` is split over K and so is the global batch, so every run trains on the
same images with the same FLOPs (`ddm config show` prints the split).
Router: the unconditional router with the cluster class prior p(c | k) (the default) against a
class-conditional router p(k | x_t, t, c), trained on the same K = 4 experts (a copy of the K = 4 run
with only the router retrained), top-1.

Every row is evaluated by `ddm eval` against the held-out split: mean ± 95% interval over --seeds
sampling seeds, with the real-vs-real reference at the same sample size.

    python benchmarks/paper_tables.py --out-dir /tmp/paper --results benchmarks/results
Writes <results>/<table>_<row>.json (config fingerprint, seeds, metric means and intervals, GFLOPs, wall
times), <results>/paper_tables.md, fd_vs_k.png and strategies.png. Reports whatever the numbers are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = "top1,topk,full,sample,oracle"


def ddm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise SystemExit(f"ddm {' '.join(args)} failed: {last}")
    return out.stdout


def sets(args: argparse.Namespace, K: int) -> list[str]:
    return [f"clustering.num_experts={K}", f"training.total_nimg={args.total_nimg}",
            f"router.training.total_nimg={args.router_nimg}", f"sampling.steps={args.steps}"]


def train_run(args: argparse.Namespace, K: int) -> tuple[str, float]:
    """Train one run. --ray: `ddm run` (local Ray, two simulated islands); default: the same stage functions
    (prepare, cluster, the training loop per job, gather) in this process, one job after another, which on
    a small shared machine avoids minutes of Ray start-up per run. A committed run is not retrained."""
    run = str(Path(args.out_dir) / f"digits-k{K}")
    t0 = time.perf_counter()
    if args.ray:
        ddm("run", "--preset", "digits", "--run", run, "--quiet", *[a for s in sets(args, K) for a in ("--set", s)])
    elif not (Path(run) / "ensemble.json").exists():
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # two runs share the machine (the pool below)
        sys.path.insert(0, str(ROOT))
        from common.config import IslandConfig, resolve_config
        from common.storage import RunStore
        from orchestrator.stages import StageRunner
        from worker.gather import gather
        from worker.partition import cluster_data
        from worker.prepare import prepare_data
        from worker.train import expert_job, job_store, router_job, train

        config = resolve_config("digits", overrides=sets(args, K) + [f"run_uri={run}"])
        store = RunStore(run)
        StageRunner(store, config).write_run_record()
        prepare_data(config, store)
        cluster_data(config, store)
        island = IslandConfig(name="local")
        for job in [expert_job(config, k, island) for k in range(K)] + [router_job(config, island)]:
            train(job, job_store(store, job))
        gather(config, store)
    return run, cached_wall(run, "train", time.perf_counter() - t0)


def cached_wall(run: str, what: str, seconds: float) -> float:
    """The wall time of the first (real) pass, kept beside the run so a resumed script reports it."""
    path = Path(run) / f"paper_{what}_wall_s.txt"
    if not path.exists():
        path.write_text(f"{seconds:.1f}")
    return float(path.read_text())


def class_router_run(base: str) -> tuple[str, float]:
    """A copy of `base` whose router is retrained class-conditional (same experts, same data)."""
    sys.path.insert(0, str(ROOT))
    from common.config import IslandConfig, RunConfig
    from common.manifests import RunRecord
    from common.storage import RunStore
    from worker.gather import gather
    from worker.train import job_store, router_job, train

    run = base + "-class-router"
    if (Path(run) / "ensemble.json").exists() and (Path(run) / "paper_train_wall_s.txt").exists():
        return run, cached_wall(run, "train", 0.0)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("paper_*", "student"))
    t0 = time.perf_counter()
    store = RunStore(run)
    record = store.read_record("run.json", RunRecord)
    tree = record.config
    tree["router"]["model"]["conditioning"] = "class"
    config = RunConfig.model_validate(tree)
    store.commit("run.json", record.model_copy(update={"config": config.model_dump(mode="json"),
                                                       "config_fingerprint": config.fingerprint()}))
    for item in ("checkpoints", "export.json", "metrics.jsonl", "samples", "status.json"):
        store.delete(f"router/{item}")
    job = router_job(config, IslandConfig(name="local"))
    train(job, job_store(store, job))
    gather(config, store)
    return run, cached_wall(run, "train", time.perf_counter() - t0)


def evaluate(args: argparse.Namespace, run: str, strategies: str) -> tuple[dict, float]:
    """`ddm eval --json`, cached beside the run per (strategies, n, seeds)."""
    cache = Path(run) / f"paper_eval_{strategies.replace(',', '-')}_{args.n}x{args.seeds}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return saved["results"], saved["wall_s"]
    t0 = time.perf_counter()
    res = json.loads(ddm("eval", run, "--json", "--n", str(args.n), "--seeds", str(args.seeds),
                         "--strategies", strategies))
    wall = time.perf_counter() - t0
    cache.write_text(json.dumps({"results": res, "wall_s": wall}))
    return res, wall


def artefact(table: str, name: str, run: str, res: dict, row: dict, train_s: float, eval_s: float,
             extra: dict | None = None) -> dict[str, Any]:
    record = json.loads((Path(run) / "run.json").read_text())
    metrics = {k: {"mean": row[k], "ci95": row.get(f"{k}_ci95"), "per_seed": row["per_seed"][k]}
               for k in row["per_seed"]}
    return {"table": table, "row": name, "run": Path(run).name, "config_fingerprint": record["config_fingerprint"],
            "code_version": record["code_version"], "num_experts": record["config"]["clustering"]["num_experts"],
            "total_nimg": record["config"]["training"]["total_nimg"],
            "router_nimg": record["config"]["router"]["training"]["total_nimg"],
            "router_conditioning": record["config"]["router"]["model"]["conditioning"],
            "strategy": row["strategy"], "seeds": res["seeds"], "num_samples": res["num_samples"],
            "sampling_steps": res["sampling"]["steps"], "cfg_scale": res["sampling"]["cfg_scale"],
            "gflops_per_sample": row["gflops_per_sample"], "metrics": metrics, "reference": res.get("reference"),
            "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1), **(extra or {})}


def separated(a: dict, b: dict, metric: str) -> bool:
    """Two rows differ only where their 95% intervals do not overlap."""
    ma, mb = a["metrics"][metric], b["metrics"][metric]
    if ma["ci95"] is None or mb["ci95"] is None:
        return False
    return abs(ma["mean"] - mb["mean"]) > ma["ci95"] + mb["ci95"]


def orderings(rows: list[dict], metric: str) -> list[str]:
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if separated(a, b, metric):
                lo, hi = sorted((a, b), key=lambda r: r["metrics"][metric]["mean"])
                out.append(f"{lo['row']} < {hi['row']}")
    return out


def md_table(rows: list[dict], metrics: list[str], first: str) -> str:
    head = f"| {first} | GFLOPs/sample | " + " | ".join(metrics) + " | artefact |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for r in rows:
        cells = [f"{r['metrics'][m]['mean']:.4g} ± {r['metrics'][m]['ci95']:.2g}" if r["metrics"][m]["ci95"] is not None
                 else f"{r['metrics'][m]['mean']:.4g}" for m in metrics]
        name = r["row"].replace("|", "\\|")  # router names hold p(k | ...): escaped inside a table cell
        lines.append(f"| {name} | {r['gflops_per_sample']:.3g} | " + " | ".join(cells) + f" | `{r['file']}` |")
    return "\n".join(lines)


def plots(results: Path, t1: list[dict], t2: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ks = [r["num_experts"] for r in t2]
    ax.errorbar(ks, [r["metrics"]["fd"]["mean"] for r in t2], yerr=[r["metrics"]["fd"]["ci95"] or 0 for r in t2],
                marker="o", capsize=3)
    ref = t2[0]["reference"]["fd_real_vs_target"]
    ax.axhspan(ref["p2.5"], ref["p97.5"], color="#ccc", alpha=0.6, label="real vs held-out (95% of draws)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (experts), same total training images")
    ax.set_ylabel("Fréchet distance (held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "fd_vs_k.png", dpi=90, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in t1:
        ax.errorbar(r["gflops_per_sample"], r["metrics"]["fd"]["mean"], yerr=r["metrics"]["fd"]["ci95"] or 0,
                    marker="o", capsize=3)
        ax.annotate(r["row"], (r["gflops_per_sample"], r["metrics"]["fd"]["mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GFLOPs per sample (measured)")
    ax.set_ylabel("Fréchet distance (held-out)")
    fig.tight_layout()
    fig.savefig(results / "strategies.png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return ["fd_vs_k.png", "strategies.png"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="runs/paper", help="run stores (large; not committed)")
    parser.add_argument("--results", default="benchmarks/results", help="JSON artefacts, tables and plots")
    parser.add_argument("--total-nimg", type=int, default=8_000, help="training images over all experts of a run")
    parser.add_argument("--router-nimg", type=int, default=2_000)
    parser.add_argument("--distill-nimg", type=int, help="student images (default: --total-nimg)")
    parser.add_argument("--ks", default="4,8,16", help="Table 2 expert counts (the K = 1 monolith is always run)")
    parser.add_argument("--n", type=int, default=128, help="samples per row and seed")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per row (>= 2 for intervals)")
    parser.add_argument("--steps", type=int, default=8, help="Euler sampling steps")
    parser.add_argument("--ray", action="store_true", help="train each run with `ddm run` on local Ray")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    ks = sorted({1, 4, *(int(k) for k in args.ks.split(","))})
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:  # two runs at a time, as two islands would
        futures = {K: pool.submit(train_run, args, K) for K in sorted(ks, key=lambda k: (k != 4, -k))}
        runs = {K: futures[K].result() for K in ks}
    crun = class_router_run(runs[4][0])
    t0 = time.perf_counter()
    if not (Path(runs[4][0]) / "student" / "export.json").exists():
        ddm("distill", runs[4][0], "--nimg", str(args.distill_nimg or args.total_nimg))
    distill_s = cached_wall(runs[4][0], "distill", time.perf_counter() - t0)

    rows: dict[str, list[dict]] = {"table1": [], "table2": [], "router": []}
    res, eval_s = evaluate(args, runs[1][0], "top1")
    mono = artefact("table1", "monolith (K = 1)", runs[1][0], res, res["rows"][0], runs[1][1], eval_s)
    rows["table1"].append(mono)
    res4, eval_s = evaluate(args, runs[4][0], STRATEGIES)
    names = {"top1": "top-1", "topk": "top-2", "full": "full (eq. 7)", "sample": "sample", "oracle": "oracle",
             "student (dense)": "student (dense)"}
    for row in res4["rows"]:
        wall = distill_s if row["strategy"].startswith("student") else runs[4][1]
        rows["table1"].append(artefact("table1", names[row["strategy"]], runs[4][0], res4, row, wall, eval_s,
                                       {"router": res4.get("router")}))
    for K in ks:
        if K == 4:
            res, row, wall = res4, res4["rows"][0], eval_s
        else:
            res, wall = evaluate(args, runs[K][0], "top1")
            row = res["rows"][0]
        rows["table2"].append(artefact("table2", f"K = {K}" + (" (monolith)" if K == 1 else ""), runs[K][0], res, row,
                                       runs[K][1], wall))
    rows["router"].append(artefact("router", "unconditional router + class prior p(c | k)", runs[4][0], res4,
                                   res4["rows"][0], runs[4][1], eval_s, {"router": res4.get("router")}))
    resc, eval_s = evaluate(args, crun[0], "top1")
    rows["router"].append(artefact("router", "class-conditional router p(k | x_t, t, c)", crun[0], resc,
                                   resc["rows"][0], crun[1], eval_s, {"router": resc.get("router")}))

    for table, table_rows in rows.items():
        for r in table_rows:
            slug = "".join(ch if ch.isalnum() else "-" for ch in r["row"].lower()).strip("-")
            while "--" in slug:
                slug = slug.replace("--", "-")
            r["file"] = str(results / f"{table}_{slug}.json")
            Path(r["file"]).write_text(json.dumps(r, indent=2) + "\n")
    images = plots(results, rows["table1"], rows["table2"])
    wall = cached_wall(args.out_dir, "tables", time.perf_counter() - start)  # the first, uncached pass
    metrics = ["fd", "class_acc"]
    ref = res4["reference"]
    fd_ref = ref["fd_real_vs_target"]
    cmd = "python benchmarks/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{cmd}` ({wall / 60:.1f} min wall). Budget per run: {args.total_nimg:,} training images over "
             f"all experts (global batch 256 split over K), router {args.router_nimg:,} images; {args.n} samples "
             f"x {args.seeds} sampling seeds per row, {args.steps} Euler steps, CFG 2. Each cell: mean ± 95% interval "
             "(Student t over seeds).",
             f"Measured against: {ref['against']}. Real-vs-real reference at n = {fd_ref['n']}: Fréchet distance "
             f"{fd_ref['mean']:.3g} (95% of {fd_ref['draws']} draws in {fd_ref['p2.5']:.3g}-{fd_ref['p97.5']:.3g}); "
             f"noise {ref['fd_noise_vs_target']:.4g}; classifier accuracy on the held-out rows "
             f"{ref['classifier_accuracy_on_target']:.3f}.", "",
             "Table 1 (strategies; K = 4 except the monolith):", "", md_table(rows["table1"], metrics, "row"), "",
             "Separated by the intervals (Fréchet distance): " + ("; ".join(orderings(rows["table1"], "fd")) or "none"),
             "", "Separated by the intervals (class accuracy): " + ("; ".join(orderings(rows["table1"], "class_acc")) or "none"),
             "", "Table 2 (K at equal total training images, top-1):", "", md_table(rows["table2"], metrics, "K"), "",
             "Separated by the intervals (Fréchet distance): " + ("; ".join(orderings(rows["table2"], "fd")) or "none"),
             "", "Router (K = 4, top-1, same experts):", "", md_table(rows["router"], metrics, "router"), "",
             "Separated by the intervals: "
             + ("; ".join(orderings(rows["router"], "fd") + orderings(rows["router"], "class_acc")) or "none"),
             "", "Plots: " + ", ".join(f"`{results / i}`" for i in images)]
    for r in rows["router"]:
        router = r.get("router")
        if router:
            for name, v in router["variants"].items():
                lines.append(f"- {r['row']}: {name}, accuracy / ECE per t-bucket " + ", ".join(
                    f"{b}: {a:.3f} / {e:.3f}" for b, a, e in zip(router["t_buckets"], v["accuracy"], v["ece"])))
    (results / "paper_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

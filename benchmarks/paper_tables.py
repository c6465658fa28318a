"""Paper Tables 1 and 2 at our scale, on `digits` and `gmm`: trains the runs, evaluates, writes tables.

Table 1 (inference strategies): one K = 4 run per dataset, every strategy of eval.strategies plus the
distilled student, with measured GFLOPs per sample.
Table 2 (number of experts): K = 1 (the monolith), 2, 4, 8 with the SAME total training FLOPs: each
expert gets global_batch / K per step (the config's FLOP matching) and duration_nimg = total / K
images, so K experts together see as many images as the monolith. Evaluated with top-1.

    python benchmarks/paper_tables.py --out-dir runs/paper [--datasets digits,gmm] [--total-nimg N]
Writes <out-dir>/paper_tables.md and .json. Reports whatever the numbers are; nothing is tuned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KS = (1, 2, 4, 8)


def ddm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ddm {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return out.stdout


def train_run(out_dir: Path, dataset: str, K: int, total_nimg: int, batch: int) -> str:
    run = str(out_dir / f"{dataset}-k{K}")
    sets = [f"clustering.num_experts={K}", f"training.global_batch={batch}",
            f"training.duration_nimg={total_nimg // K}"]
    ddm("run", "--preset", dataset, "--run", run, "--quiet", *[a for s in sets for a in ("--set", s)])
    return run


def evaluate(run: str, n: int, strategies: str) -> dict:
    return json.loads(ddm("eval", run, "--json", "--n", str(n), "--strategies", strategies))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="runs/paper")
    parser.add_argument("--datasets", default="digits,gmm")
    parser.add_argument("--total-nimg", type=int, default=192_000, help="images over all experts together")
    parser.add_argument("--batch", type=int, default=256, help="global batch (split over K)")
    parser.add_argument("--n", type=int, default=512, help="samples per evaluated row")
    parser.add_argument("--distill-nimg", type=int, default=None,
                        help="images the student sees (default: --total-nimg, the ensemble's own budget)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: dict = {"total_nimg": args.total_nimg, "batch": args.batch, "table1": {}, "table2": {}}
    lines = ["# Paper tables at our scale", "",
             f"Total training images per run {args.total_nimg:,} (split over K experts), global batch {args.batch}.", ""]
    for dataset in args.datasets.split(","):
        runs = {K: train_run(out_dir, dataset, K, args.total_nimg, args.batch) for K in KS}
        ddm("distill", runs[4], "--nimg", str(args.distill_nimg or args.total_nimg))
        t1 = evaluate(runs[4], args.n, "top1,topk,full,sample,oracle")
        tables["table1"][dataset] = t1
        lines += [f"## Table 1 ({dataset}, K = 4): inference strategies", "", _md(t1["rows"]), ""]
        rows = []
        for K, run in runs.items():
            res = evaluate(run, args.n, "top1")
            rows.append({"K": K, **res["rows"][0]})
        tables["table2"][dataset] = rows
        lines += [f"## Table 2 ({dataset}): number of experts, same total FLOPs (K = 1 is the monolith)", "", _md(rows), ""]
    (out_dir / "paper_tables.json").write_text(json.dumps(tables, indent=2))
    (out_dir / "paper_tables.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _md(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
    return head + "\n" + "\n".join("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows)


if __name__ == "__main__":
    main()

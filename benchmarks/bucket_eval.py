"""Aspect-ratio buckets against square-only training, judged at each bucket's shape.

Two `ddm run`s (local Ray) on the same mixed-aspect builtin:shapes source (ratios 0.5, 1, 2), same budget:
- bucketed: data.buckets on, each image resized to its nearest bucket (12x20, 16x16, 20x12 pixels);
- square-only: buckets off, each image centre-cropped to the 16x16 square (what a square pipeline does).
Then `ddm eval <bucketed> --compare square-only=<square>` samples both ensembles class-conditionally at every
bucket shape and judges each sample with one shape-agnostic classifier trained on the bucketed run's
training rows; the reference is that classifier on the real held-out rows of each shape.

    python benchmarks/bucket_eval.py --out-dir /tmp/ddm-buckets --results benchmarks/results [--set model.patch_size=2]
Writes <results>/<name>.json (default bucket_eval.json; the whole `ddm eval --json` output plus the commands and wall times) and
prints the table. A run that already finished is not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from paper_tables import ddm  # noqa: E402 - the one CLI runner of the benchmark scripts

RATIOS = "data.shapes_aspect_ratios=[0.5,1,2]"


def run_wall_s(run: Path) -> float:
    """Prepare's start to gather's end, from the run's own stage records: the same figure when a finished
    run is evaluated again (a rerun of this script trains nothing and takes seconds)."""
    from common.manifests import StageRecord
    from common.storage import RunStore

    store = RunStore(str(run))
    prepare, gather = (store.read_record(f"stages/{stage}.json", StageRecord) for stage in ("prepare", "gather"))
    return round((datetime.fromisoformat(gather.finished_at) - datetime.fromisoformat(prepare.started_at)).total_seconds(), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="runs/buckets", help="the two run stores (not committed)")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--name", default="bucket_eval", help="the artefact's file name, without .json")
    parser.add_argument("--total-nimg", type=int, default=256_000, help="training images over all experts, each run")
    parser.add_argument("--n", type=int, default=256, help="samples per shape, model and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs (e.g. model.patch_size=2)")
    args = parser.parse_args(argv)
    out, results = Path(args.out_dir), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    runs = {"bucketed": ["--set", "data.buckets.enabled=true"], "square-only": []}
    commands, walls = {}, {}
    for name, extra in runs.items():
        cmd = ["run", "--preset", "shapes", "--run", str(out / name), "--quiet", "--set", RATIOS,
               "--set", f"training.total_nimg={args.total_nimg}", *[a for kv in args.set for a in ("--set", kv)], *extra]
        commands[name] = "ddm " + " ".join(cmd)
        ddm(*cmd)
        walls[name] = run_wall_s(out / name)
    cmd = ["eval", str(out / "bucketed"), "--json", "--n", str(args.n), "--seeds", str(args.seeds),
           "--compare", f"square-only={out / 'square-only'}"]
    commands["eval"] = "ddm " + " ".join(cmd)
    t0 = time.perf_counter()
    res = json.loads(ddm(*cmd))
    walls["eval"] = round(time.perf_counter() - t0, 1)
    (results / f"{args.name}.json").write_text(json.dumps({"commands": commands, "wall_s": walls, **res}, indent=2) + "\n")
    from worker.eval_buckets import to_markdown

    print(f"wall (s): {walls} (each run from prepare's start to gather's end, from its stage records)")
    print(to_markdown(res))


if __name__ == "__main__":
    main()

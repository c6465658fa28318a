"""`ddm run` and `ddm status`."""

from __future__ import annotations

import argparse
import json
import logging

from common.config import resolve_config
from common.storage import RunStore
from orchestrator.cli import COMMANDS, add_config_args
from orchestrator.stages import STAGES


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.run:
        overrides.append(f"run_uri={args.run}")
    config = resolve_config(args.preset, args.config, overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from orchestrator.pipeline import run_pipeline

    summary = run_pipeline(config, until=args.until, address=args.address, show_progress=not args.quiet)
    print(f"\nrun {config.name} finished in {summary.wall_s:.1f}s; run store: {summary.run_uri}")
    for name, info in summary.stages.items():
        state = "skipped (committed)" if info["skipped"] else f"{info['duration_s']:.1f}s"
        print(f"  {name:<8} {state}")
    from orchestrator.status import collect_status

    for job in collect_status(RunStore(summary.run_uri, config.storage))["jobs"]:
        loss = f"loss {job['loss']:.4f}" if job["loss"] is not None else ""
        print(f"  {job['prefix']:<11} {job['state']:<10} {job['nimg']:>9,} img  retries {job['retries']}  {loss}")
    for what, where in summary.outputs.items():
        print(f"{what}: {where}")
    if summary.outputs:
        print(f"next: ddm sample {summary.run_uri} --out grid.png; ddm eval {summary.run_uri}; "
              f"ddm report {summary.run_uri}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.status import collect_status, format_status

    status = collect_status(RunStore(args.run))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the whole pipeline (default: the embedded digits demo)")
    add_config_args(run)
    run.add_argument("--run", help="run store URI (overrides run_uri): path, file://, memory:// or s3://")
    run.add_argument("--until", default="gather", choices=STAGES, help="stop after this stage")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="stages and per-job progress, from the run store alone")
    status.add_argument("run", help="run store URI or path")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


COMMANDS.append(register)

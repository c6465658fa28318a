"""`ddm run`, `ddm status` and `ddm verify`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from common.config import resolve_config
from common.errors import UsageError
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

    summary = run_pipeline(config, until=args.until, address=args.address, show_progress=not args.quiet,
                           redo=args.redo, allow_local_store=args.allow_local_store,
                           connect_timeout_s=args.connect_timeout)
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
    from orchestrator.status import collect_status, expert_files, format_status

    if args.files:  # one source key per line: the files that trained expert K
        if args.expert is None:
            raise UsageError("status --files: name the expert (--expert K)")
        keys = expert_files(RunStore(args.run), args.expert)
        print(json.dumps(keys, indent=2) if args.json else "\n".join(keys))
        print(f"expert {args.expert}: {len(keys)} training rows", file=sys.stderr)
        return 0
    status = collect_status(RunStore(args.run))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Full sha256 of every payload a record lists; exit 1 when anything is damaged."""
    from orchestrator.verify import format_findings, verify

    store = RunStore(args.run)
    if not store.exists("run.json"):
        raise UsageError(f"{store.url}: no run.json (not a DDM run store)")
    findings = verify(store, full=True)
    if args.json:
        print(json.dumps([{"key": f.key, "owner": f.owner, "size": f.size, "ok": f.ok, "problem": f.problem}
                          for f in findings], indent=2))
    else:
        print(format_findings(findings, show_ok=not args.damaged_only))
    return 0 if all(f.ok for f in findings) else 1


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the whole pipeline (default: the embedded digits demo)")
    add_config_args(run)
    run.add_argument("--run", help="run store URI (overrides run_uri): path, file://, memory:// or s3://")
    run.add_argument("--until", default="gather", choices=STAGES, help="stop after this stage")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="give up on an unreachable --address after this long (default: 30)")
    run.add_argument("--allow-local-store", action="store_true",
                     help="cluster mode: accept a run store inside the job's working dir or in memory")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--redo", choices=STAGES, help="redo this committed stage and every later one (removes "
                     "their outputs); needed when a committed stage's inputs changed")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="stages and per-job progress, from the run store alone")
    status.add_argument("run", help="run store URI or path")
    status.add_argument("--json", action="store_true")
    status.add_argument("--expert", type=int, metavar="K", help="with --files: the expert to trace")
    status.add_argument("--files", action="store_true", help="list the source files (keys) that trained expert K")
    status.set_defaults(func=cmd_status)
    verify = sub.add_parser("verify", help="check every committed payload's sha256; a per-key report")
    verify.add_argument("run", help="run store URI or path")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--damaged-only", action="store_true", help="print only the damaged keys")
    verify.set_defaults(func=cmd_verify)


COMMANDS.append(register)

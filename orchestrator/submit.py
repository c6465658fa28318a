"""`ddm submit`: the same `ddm` command as a Ray job on a running cluster (Ray Jobs SDK).

The code travels as the job's working directory, so the cluster needs Ray and the dependencies but
not this package: the entrypoint is `python -m orchestrator <args>`, run from the unpacked copy.
The job driver gets RAY_ADDRESS from Ray, so `ddm run` inside it joins the cluster, not a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.config import load_yaml_mapping, resolve_config
from common.errors import DDMError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: run stores, VCS data, caches and build outputs (the upload limit is ~500 MiB).
EXCLUDES = ["runs/", "out/", ".git/", "__pycache__/", ".pytest_cache/", ".benchmarks/", "*.egg-info/",
            ".venv/", "build/", "*.tmp-*"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(DDMError, RuntimeError):
    """A submission problem, phrased as one line for the user."""


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local dashboard."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def ddm_argv(run_args: list[str]) -> list[str]:
    """The `ddm` arguments the job runs: one leading `--` dropped; none, or an option first, mean `run`."""
    args = list(run_args)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0].startswith("-"):
        args = ["run", *args]
    return args


def build_entrypoint(run_args: list[str]) -> str:
    """`python -m orchestrator <args>`: runs from the uploaded working dir, installed or not."""
    return shlex.join(["python", "-m", "orchestrator", *ddm_argv(run_args)])


def build_runtime_env(working_dir: str = ".", runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Working dir + excludes, with the caller's runtime env merged on top (its excludes are added)."""
    path = Path(working_dir)
    if not (path / "orchestrator" / "__main__.py").is_file():
        raise SubmitError(f"--working-dir {working_dir}: not a checkout of this project (no orchestrator/__main__.py)")
    env: dict[str, Any] = dict(runtime_env or {})
    excludes = list(dict.fromkeys([*EXCLUDES, *env.pop("excludes", [])]))
    env.setdefault("working_dir", str(path))
    env_vars = {"PYTHONUNBUFFERED": "1", **env.pop("env_vars", {})}  # logs arrive as they are written
    return {**env, "excludes": excludes, "env_vars": env_vars}


@contextmanager
def _explicit_address() -> Iterator[None]:
    # JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its `address`
    # argument; we already folded them into the address we pass, so hide them for the call.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_headers(url: str) -> dict[str, str]:
    """Ray's token auth, as `ray start` applies it: with RAY_AUTH_MODE unset, a local token
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is offered to a loopback job server
    only (a laptop cluster, a tunnel or a port-forward). RAY_AUTH_MODE=token lets the SDK send it
    anywhere; RAY_AUTH_MODE=disabled sends nothing."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return {}
    host = (urlsplit(url if "://" in url else f"http://{url}").hostname or "").lower()
    if host not in {"127.0.0.1", "localhost", "::1"}:
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return {}
    return {"authorization": "Bearer " + loader.get_raw_token(ignore_auth_mode=True)}


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster, or SubmitError naming the address."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=_auth_headers(url))
    except Exception as exc:  # the SDK raises ConnectionError, ValueError or RuntimeError here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if reason.startswith("Authentication"):
            raise SubmitError(f"the Ray job server at {url} refused us ({reason}); give it the cluster's token "
                              f"in RAY_AUTH_TOKEN and set RAY_AUTH_MODE=token") from None
        detail = "" if url in reason else f" ({reason})"
        raise SubmitError(f"no Ray job server answers at {url}{detail}; start one with `ray start --head` "
                          f"or pass --address") from None


def follow_logs(client: Any, job_id: str, out: Any = None) -> None:
    """Stream the job's logs to `out` until the job ends (the SDK tails over a websocket)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


AGENT_WAIT_S = 60.0  # how long a submission waits for a starting head's job agent
NO_AGENT = "No available agent to submit job"


def wait_terminal(client: Any, job_id: str, timeout_s: float | None = 30.0) -> str:
    """The job's status once it is final, or its last status after timeout_s (None = no limit)."""
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def submit(address: str | None, run_args: list[str], working_dir: str = ".",
           runtime_env: dict[str, Any] | None = None, follow: bool = True) -> str:
    """Submit `python -m orchestrator <run_args>` as a Ray job; print its id; follow its logs.

    Returns the job's final status (SUCCEEDED, FAILED, STOPPED) when following, else its status
    right after submission. The args are sent as given; `ddm submit` checks them locally first.
    """
    client = connect(address)
    entrypoint = build_entrypoint(run_args)
    env = build_runtime_env(working_dir, runtime_env)
    url = client.get_address()
    deadline, told = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                       metadata={"ddm": "1", "entrypoint": entrypoint[:200]})
            break
        except Exception as exc:  # e.g. a working dir over the upload limit, a bad runtime env field
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            # A head that has just started answers this until its job agent is up: Ray asks to retry.
            if NO_AGENT in reason and time.monotonic() < deadline:
                if not told:  # one line for the whole wait, not one per attempt
                    print(f"the Ray job server at {url} has no job agent up yet; retrying for up to "
                          f"{AGENT_WAIT_S:.0f} s", file=sys.stderr, flush=True)
                    told = True
                time.sleep(2.0)
                continue
            raise SubmitError(f"the Ray job server at {url} refused the job: {reason}") from None
    print(f"submitted job {job_id} to {url}: {entrypoint}", flush=True)
    if not follow:
        print(f"follow it with: ray job logs --follow {job_id} --address {url}", flush=True)
        return str(client.get_job_status(job_id).value)
    timeout_s: float | None = 30.0  # the log stream closes a moment before the status flips
    try:
        follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id} --address {url})",
              file=sys.stderr)
        return str(client.get_job_status(job_id).value)
    except Exception as exc:  # a dropped websocket must not lose the job's outcome
        print(f"log stream lost ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              f"waiting for job {job_id} to finish", file=sys.stderr)
        timeout_s = None
    status = wait_terminal(client, job_id, timeout_s)
    print(f"job {job_id}: {status}", flush=True)
    return status


def _check_locally(run_args: list[str], working_dir: str) -> None:
    """Parse the args with this `ddm`, and resolve the config, before spending cluster time on them."""
    from orchestrator.cli import _load_commands, build_parser

    _load_commands()
    ns = build_parser().parse_args(ddm_argv(run_args))  # UsageError -> one line, exit 2
    if hasattr(ns, "overrides") and hasattr(ns, "config"):
        config = ns.config
        if config is not None and not Path(config).is_absolute():
            config = str(Path(working_dir) / config)  # the job resolves it inside its working dir
        resolve_config(ns.preset, config, ns.overrides)  # ConfigError -> one line, exit 2


def _load_runtime_env(path: str | None) -> dict[str, Any] | None:
    return None if path is None else load_yaml_mapping(path, "--runtime-env")


def cmd_submit(args: argparse.Namespace) -> int:
    """Bad usage or config exits 2 before anything is sent; an unreachable cluster or a failed job exits 1."""
    from orchestrator.cli import UsageError

    try:
        runtime_env = build_runtime_env(args.working_dir, _load_runtime_env(args.runtime_env))
    except SubmitError as exc:
        raise UsageError(str(exc)) from None
    _check_locally(args.run_args, args.working_dir)
    status = submit(args.address, args.run_args, working_dir=args.working_dir,
                    runtime_env=runtime_env, follow=not args.no_follow)  # SubmitError: one line, exit 1
    return 0 if status not in {"FAILED", "STOPPED"} else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="run a ddm command as a Ray job on a cluster (Ray Jobs SDK)",
                              description="ddm submit [--address URL] [--no-follow] -- <run args>; args starting "
                                          "with an option mean `run` (e.g. -- --config deploy/islands.example.yaml).")
    p.add_argument("--address", help=f"Ray dashboard URL (default: RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return without following its logs")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--runtime-env", help="YAML runtime env merged on top (e.g. deploy/runtime_env.yaml)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: the ddm command to run (default: run)")
    p.set_defaults(func=cmd_submit)


from orchestrator.cli import COMMANDS  # noqa: E402  (registered on import, like the other command modules)

COMMANDS.append(register)

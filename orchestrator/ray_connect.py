"""Connecting the driver to Ray: a cluster (an address, RAY_ADDRESS, or the submitted job's), or a local
instance sized to this machine whose single node carries every island's custom resources, so the same
scheduling path runs as on a cluster. A driver that is about to prepare starts Ray while its source is
hashed, and creates Ray Data's service actors before the pipeline's own.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import ray

from common.config import RunConfig
from common.errors import DDMError, UsageError
from common.storage import normalize_url
from orchestrator.islands import local_node_resources

log = logging.getLogger(__name__)
T = TypeVar("T")

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor on a submitted job's driver


# Env vars every Ray worker of the run should have. A job's runtime env (`ray job submit --runtime-env`)
# wins: ray.init refuses a runtime env that sets a key the job's already sets, so only absent keys go.
# OMP_NUM_THREADS is Ray's: each worker gets its actor's num_cpus (an island's cpus_per_worker).
DRIVER_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false",
                   "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}  # the dashboard's Train tab
CONNECT_TIMEOUT_S = 30.0


def job_runtime_env() -> dict | None:
    """The runtime env of the Ray job this driver runs in (None outside a submitted job)."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env() -> dict | None:
    """DRIVER_ENV_VARS minus the keys the job's runtime env or this process's environment already set."""
    job_vars = (job_runtime_env() or {}).get("env_vars") or {}
    env_vars = {k: v for k, v in DRIVER_ENV_VARS.items() if k not in job_vars and k not in os.environ}
    return {"env_vars": env_vars} if env_vars else None


def in_cluster_mode(address: str | None) -> bool:
    """A driver inside a submitted Ray job, or one told to join a running cluster."""
    return bool(address or os.environ.get("RAY_ADDRESS") or job_runtime_env() is not None)


def check_durable_store(run_uri: str, cluster_mode: bool, allow_local_store: bool) -> None:
    """Cluster mode refuses a run store that dies with the job or lives on one machine only.

    A relative path inside a submitted job resolves into Ray's unpacked working dir
    (`.../runtime_resources/working_dir_files/_ray_pkg_...`), deleted with the job's cache; a
    `memory://` store lives in one process. Both are one clear line, not a silently lost run.
    """
    if not cluster_mode or allow_local_store:
        return
    url = normalize_url(run_uri)
    scheme, path = url.split("://", 1)
    if scheme == "memory":
        reason = "lives in one process's memory"
    elif scheme == "file" and ("runtime_resources" in path or "://" not in run_uri and not Path(run_uri).expanduser().is_absolute()):
        reason = f"resolves to {path}, inside the job's working dir or this machine's cwd"
    else:
        return
    raise UsageError(f"run store {run_uri} {reason}; in cluster mode give run_uri=s3://bucket/run (or --run "
                     f"a path on a filesystem every node mounts), or pass --allow-local-store to keep it there")


class ClusterUnreachable(DDMError):
    """No Ray head answers at the address, or it refuses our token: one line, exit 1."""


def probe_cluster(address: str, timeout_s: float) -> None:
    """Fail in seconds, with one line, where ray.init would retry for minutes: nothing listening at
    the address, or a token-auth cluster refusing us."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"--address {address}: expected HOST:PORT (the head's GCS port, default 6379) "
                              "or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachable(f"no Ray cluster answers at {address} within {timeout_s:g}s ({exc.strerror or exc}); "
                              "check the head's address and port, or start one with `ray start --head`") from None
    if address.startswith("ray://"):
        return  # Ray Client: the server authenticates at ray.init
    from ray._raylet import GcsClient

    with _quiet_stderr():  # the C++ client logs each refusal itself; one line of ours is enough
        try:
            GcsClient(address=hostport)
        except Exception as exc:  # noqa: BLE001 - AuthenticationError, RpcError: phrased below
            if "auth" in type(exc).__name__.lower() or "AuthToken" in str(exc):
                raise ClusterUnreachable(f"the Ray cluster at {address} refused our token; set RAY_AUTH_MODE=token and "
                                      "RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH)") from None
            raise ClusterUnreachable(f"the Ray cluster at {address} did not answer as a Ray head: "
                                  f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def connect_ray(config: RunConfig, address: str | None,
                timeout_s: float = CONNECT_TIMEOUT_S) -> tuple[bool, str | None]:
    """Connect to a cluster (address / RAY_ADDRESS) or start a local instance. Returns (local, dashboard)."""
    if ray.is_initialized():
        return False, None
    # Prepare's Ray Data pipeline and Ray Train both import ray.data (seconds of CPU on a small machine):
    # import it while ray.init waits on the processes it starts, not after.
    threading.Thread(target=importlib.import_module, args=("ray.data",), name="ddm-import", daemon=True).start()
    address = address or os.environ.get("RAY_ADDRESS")
    env = driver_runtime_env()
    if address:
        probe_cluster(address, timeout_s)
        context = ray.init(address=address, runtime_env=env, log_to_driver=False)
        return False, context.dashboard_url
    # The Ray Train controller reads it where the trainer is built; the runtime env carries it to actors.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    num_cpus = os.cpu_count() or 1
    resources = local_node_resources(config, num_cpus) if config.islands.simulate else {}
    # Dashboard on loopback only; Ray's token authentication is left as Ray configures it.
    context = ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env,
                       _temp_dir=f"/tmp/ddm-ray-{os.getuid()}")
    return True, context.dashboard_url


def start_ray_data_services() -> None:
    """Create Ray Data's per-cluster service actors (stats, autoscaling coordinator, actor locations) now.
    The first dataset creates them otherwise, each a process importing ray.data (about 2 s of CPU on the
    2-core box), at the same moment as the encoder actors, whose start they slow. These are the functions
    Ray Data itself calls (get-or-create by name); an internal API of the pinned Ray, so if it moves the
    first dataset creates them as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.execution.node_trackers.actor_location import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
        get_or_create_actor_location_tracker()
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("Ray Data's service actors not started early: %s", exc)


def in_background(fn: Callable[[], T], name: str) -> Callable[[], T]:
    """Run `fn` in a daemon thread; the returned function waits for it, then returns its result or raises
    its error."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()

    def join() -> T:
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]
    return join

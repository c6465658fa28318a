"""Case 4: one driver per run store. The lease is a conditional create (O_EXCL-style link on file://,
If-None-Match: * on S3); two drivers that start together: exactly one proceeds."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import uuid

import pytest

from common.config import StorageConfig
from common.storage import RunStore
from orchestrator.cli import main
from orchestrator.lease import LEASE_KEY, LeaseHeld, LeaseLost, RunLease


def _contend(url: str, barrier, results) -> None:
    """One driver: wait for the other, then both try to take the lease at the same instant."""
    store = RunStore(url, StorageConfig())
    barrier.wait(timeout=60)
    try:
        lease = RunLease(store, ttl_s=30).acquire()
    except LeaseHeld as exc:
        results.put(("refused", os.getpid(), str(exc)))
        return
    results.put(("held", os.getpid(), ""))
    time.sleep(3)  # the other driver has long given up by now
    lease.release()


@pytest.fixture(params=["file", "s3"])
def shared_url(request, tmp_path) -> str:
    if request.param == "file":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_endpoint")
    return f"s3://ddm-test/lease-{uuid.uuid4().hex[:8]}"


def test_two_drivers_start_together_exactly_one_proceeds(shared_url: str) -> None:
    ctx = mp.get_context("spawn")  # real processes (distinct pids), no inherited Ray state
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(shared_url, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    kinds = sorted(o[0] for o in outcomes)
    assert kinds == ["held", "refused"], outcomes
    holder = next(o[1] for o in outcomes if o[0] == "held")
    refusal = next(o[2] for o in outcomes if o[0] == "refused")
    assert f"pid {holder}" in refusal and "\n" not in refusal
    assert not RunStore(shared_url).exists(LEASE_KEY)  # released by its holder


def test_expired_lease_is_taken_over_with_a_message(shared_url: str, caplog) -> None:
    store = RunStore(shared_url)
    stale = {"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat_at": "2026-01-01T00:00:00+00:00",
             "expires_at": "2026-01-01T00:01:00+00:00", "expires_unix": time.time() - 5}
    store.write_bytes(LEASE_KEY, json.dumps(stale).encode())
    with caplog.at_level("WARNING"), RunLease(store, ttl_s=30) as lease:
        assert json.loads(store.read_bytes(LEASE_KEY))["owner"] == lease.owner
    assert "taking over the lease of elsewhere pid 1 (heartbeat expired" in caplog.text


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = RunStore(str(tmp_path / "run"))
    body = {"owner": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "expires_unix": time.time() + 600}
    store.write_bytes(LEASE_KEY, json.dumps(body).encode())
    with RunLease(store, ttl_s=30):  # a SIGKILLed driver's lease does not block the rerun for its TTL
        pass


def test_a_driver_whose_lease_was_taken_stops(tmp_path) -> None:
    store = RunStore(str(tmp_path / "run"))
    lease = RunLease(store, ttl_s=0.4).acquire()
    store.write_bytes(LEASE_KEY, json.dumps({"owner": "other", "host": "h", "pid": 7}).encode())
    time.sleep(0.5)  # > one heartbeat (ttl / 4)
    with pytest.raises(LeaseLost, match="taken over by h pid 7"):
        lease.check()
    lease.release()
    assert store.exists(LEASE_KEY)  # the new holder's lease is not ours to remove


def test_ddm_run_on_a_leased_store_exits_with_one_line_naming_the_holder(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with RunLease(RunStore(str(run)), ttl_s=30):
        code = main(["run", "--run", str(run), "--quiet", "--set", "data.max_items=64"])
    err = capsys.readouterr().err.strip()
    assert code == 75 and len(err.splitlines()) == 1
    assert f"pid {os.getpid()}" in err and "driven by another" in err

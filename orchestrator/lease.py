"""One driver per run store: a lease object `lease.json` that records who drives the run.

The lease is created with the store's exclusive create (file://: a hard link that fails if the file
exists; s3://: a PUT with `If-None-Match: *`; see RunStore.create_exclusive for endpoints without
conditional writes). Its holder rewrites it every `ttl / 4` seconds (the heartbeat) and checks it still
holds it; a second driver exits with one line naming the holder. A lease whose heartbeat has expired,
or whose holder is a dead process on this host, is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from common.errors import DDMError
from common.storage import RunStore

log = logging.getLogger(__name__)
LEASE_KEY = "lease.json"


class LeaseHeld(DDMError):
    """Another live driver holds the run store. Exit 75 (EX_TEMPFAIL: try again once it has finished)."""
    exit_code = 75


class LeaseLost(DDMError):
    """This driver's lease was taken over (its heartbeat stalled past the expiry); it stops writing."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLease:
    """`with RunLease(store, ttl_s): ...` holds the run store's lease for the block."""

    def __init__(self, store: RunStore, ttl_s: float, command: str = "ddm run") -> None:
        self.store, self.ttl_s, self.command = store, ttl_s, command
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.acquired_at = time.time()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "command": self.command,
                           "acquired_at": _iso(self.acquired_at), "heartbeat_at": _iso(now),
                           "expires_at": _iso(now + self.ttl_s), "expires_unix": now + self.ttl_s,
                           "ttl_s": self.ttl_s}, indent=1).encode()

    def read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(LEASE_KEY))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign content: treated as expired below

    def acquire(self) -> RunLease:
        for _ in range(3):  # a takeover can race another taker; the loser sees a live holder next time
            if self.store.create_exclusive(LEASE_KEY, self._body()):
                self._start_heartbeat()
                return self
            holder = self.read()
            if holder is None:
                continue  # released between our create and our read
            why = self._stale(holder)
            if why is None:
                raise LeaseHeld(
                    f"{self.store.url} is driven by another `{holder.get('command', 'ddm')}`: {holder.get('host')} "
                    f"pid {holder.get('pid')}, heartbeat {holder.get('heartbeat_at')}, lease expires "
                    f"{holder.get('expires_at')}; wait for it to finish (ddm status {self.store.url})")
            log.warning("%s: taking over the lease of %s pid %s (%s)", self.store.url, holder.get("host"),
                        holder.get("pid"), why)
            self.store.delete(LEASE_KEY)
        raise LeaseHeld(f"{self.store.url}: could not take the lease (another driver keeps taking it)")

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lease may be taken over, or None while it is live."""
        expires = holder.get("expires_unix")
        if not isinstance(expires, (int, float)):
            return "unreadable lease"
        if time.time() > expires:
            return f"heartbeat expired at {holder.get('expires_at')}"
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _pid_alive(pid):
            return f"process {pid} on this host is gone"
        return None

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="ddm-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                holder = self.read()
                if not holder or holder.get("owner") != self.owner:
                    self.lost = f"taken over by {holder.get('host') if holder else '?'} pid {holder.get('pid') if holder else '?'}"
                    log.error("%s: lease lost (%s); this driver stops", self.store.url, self.lost)
                    return
                self.store.write_bytes(LEASE_KEY, self._body())
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried; expiry decides
                log.warning("%s: lease heartbeat failed: %s", self.store.url, exc)

    def check(self) -> None:
        """Raise LeaseLost if another driver took the lease (called between stages and on ticks)."""
        if self.lost:
            raise LeaseLost(f"{self.store.url}: lease {self.lost}; stopped so two drivers never write one store")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder and holder.get("owner") == self.owner:
            self.store.delete(LEASE_KEY)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(store: RunStore) -> dict | None:
    """The current lease (for `ddm status`), or None."""
    try:
        return json.loads(store.read_bytes(LEASE_KEY))
    except (FileNotFoundError, ValueError):
        return None

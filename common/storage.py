"""The run store: one fsspec root per run, with the commit protocol of docs/design.md §4.

- Payloads are immutable: `put_payload` refuses to overwrite a key with different content.
- A record (small JSON) listing payloads with their sha256 is written last; readers trust only
  records, and `get_payload` verifies size and sha256 on every read.
- `scoped(prefixes)` returns a view that raises `ScopeError` for any key outside its prefixes;
  expert jobs only ever receive such a view.
Credentials are never taken from, or written to, the config: s3fs reads the AWS environment/chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import fsspec
from pydantic import BaseModel, ValidationError

from common.config import StorageConfig
from common.errors import DDMError, UsageError
from common.manifests import FileRef, ManifestError, check_relative_path
from common.transient import is_transient, not_implemented

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


class StoreError(DDMError, RuntimeError):
    """A storage operation that failed for good; the message names the key."""


class IntegrityError(StoreError):
    """A payload whose size or sha256 does not match its record."""


class ScopeError(DDMError, PermissionError):
    """Access to a key outside a scoped view's prefixes."""


class StoreUnavailable(DDMError, ConnectionError):
    """Transient errors that outlasted `storage.retry_deadline_s`; a rerun resumes."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_transient(exc: BaseException) -> bool:
    return is_transient(exc, (ScopeError, IntegrityError, StoreUnavailable))


_MEMORY_LOCK = threading.Lock()


def normalize_url(url: str) -> str:
    """Local paths become absolute file:// URLs so other processes resolve them identically."""
    if "://" not in url:
        return "file://" + str(Path(url).expanduser().resolve())
    return url.rstrip("/")


def _durable_temp(path: str, data: bytes) -> str:
    """Write `data` to a fresh temp file beside `path`, synced to disk; returns its name (for an atomic
    rename or link into place)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class RunStore:
    """Key/value access to one run root. Keys are relative POSIX paths."""

    def __init__(self, url: str, config: StorageConfig | None = None) -> None:
        self.url = normalize_url(url)
        self.config = config or StorageConfig()
        self.protocol = self.url.split("://", 1)[0]
        self._fs: fsspec.AbstractFileSystem | None = None

    # Pickled into Ray tasks: the filesystem object is rebuilt on the other side.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            options: dict = {}
            if self.protocol == "s3":
                endpoint = self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                client_kwargs = {k: v for k, v in {"endpoint_url": endpoint, "region_name": self.config.region}.items() if v}
                # botocore's own retry loop is kept short: this store's `_retry` owns backoff and the deadline.
                options = {"client_kwargs": client_kwargs, "use_listings_cache": False, "skip_instance_cache": True,
                           "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                             "connect_timeout": 10}}
            try:
                self._fs = fsspec.filesystem(self.protocol, **options)
            except (ValueError, ImportError) as exc:  # unknown protocol, or its client is not installed
                raise UsageError(f"{self.url}: cannot open this storage ({str(exc).splitlines()[0]})") from None
        return self._fs

    def _path(self, key: str) -> str:
        try:
            check_relative_path(key)
        except ValueError as exc:
            raise StoreError(f"{key}: {exc}") from None
        return f"{self._root}/{key}"

    @property
    def _root(self) -> str:
        """The run root as the filesystem names it (memory:// paths are absolute)."""
        root = self.url.split("://", 1)[1]
        return "/" + root.lstrip("/") if self.protocol == "memory" else root

    def _retry(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Retry transient errors with doubling backoff until `retries` or `retry_deadline_s` runs out."""
        delay, start, attempt = self.config.backoff_s, time.monotonic(), 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
                if not _is_transient(exc):
                    raise
                elapsed = time.monotonic() - start
                if attempt >= self.config.retries or elapsed + delay > self.config.retry_deadline_s:
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                    raise StoreUnavailable(
                        f"storage {self.url}: {what} {key or '/'} kept failing for {elapsed:.0f}s "
                        f"({type(exc).__name__}: {reason}); gave up after {attempt} retries "
                        f"(storage.retries = {self.config.retries}, storage.retry_deadline_s = "
                        f"{self.config.retry_deadline_s:g}); rerun the same command to resume") from exc
                attempt += 1
                log.warning("%s %s: transient %s, retry %d/%d in %.1fs", what, key, type(exc).__name__,
                            attempt, self.config.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    # ---- raw access (used by records and by the view checks) --------------------------------------
    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self._retry("read", key, lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}/{key}: not found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic replace: readers see the old or the new content, never a torn file."""
        path = self._path(key)

        def write() -> None:
            if self.protocol == "file":
                os.replace(_durable_temp(path, data), path)
            else:  # an object PUT is atomic on S3 and in memory
                self.fs.pipe_file(path, data)

        self._retry("write", key, write)

    def append_text(self, key: str, text: str) -> None:
        """Append to a log-like file (metrics.jsonl). Not part of the commit protocol."""
        if self.protocol == "file":
            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        old = self.read_bytes(key) if self.exists(key) else b""
        self.write_bytes(key, old + text.encode())

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; True if this call created it.

        file:// links a fully written temp file into place (link fails if the target exists: O_EXCL
        semantics, and no reader ever sees a partial file). s3:// sends `If-None-Match: *`; an endpoint
        that answers 501/NotImplemented falls back to check, put, read back (not atomic: two creators
        within one round trip can both succeed; the lease's heartbeat check then stops the loser).
        On a retried request, reading back our own bytes counts as success.
        """
        path = self._path(key)
        if self.protocol == "file":
            tmp = _durable_temp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: O_EXCL (a reader may briefly see it empty)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return True
            finally:
                os.unlink(tmp)
        if self.protocol == "memory":  # one process owns a memory:// filesystem
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        try:
            if self.protocol != "s3":
                raise NotImplementedError(self.protocol)
            self._retry("create", key, lambda: self.fs.pipe_file(path, data, mode="create"))
            return True
        except FileExistsError:
            return self._owned(key, data)
        except (NotImplementedError, OSError) as exc:
            if not isinstance(exc, NotImplementedError) and not not_implemented(exc):
                raise
            log.warning("%s: the endpoint refuses conditional writes; creating %s by check, put, read back",
                        self.url, key)
            if self.exists(key):
                return self._owned(key, data)
            self.write_bytes(key, data)
            return self._owned(key, data)

    def _owned(self, key: str, data: bytes) -> bool:
        try:
            return self.read_bytes(key) == data
        except FileNotFoundError:
            return False

    def info_all(self, prefix: str = "") -> dict[str, dict]:
        """The filesystem's info (size, ETag or mtime) of every key under `prefix`, in one listing."""
        base = self._path(prefix.rstrip("/")) if prefix else self._root
        try:
            found = self._retry("list", prefix, lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        cut = len(self._root) + 1
        out = {}
        for item, info in found.items():
            name = ("/" + item.lstrip("/") if self.protocol == "memory" else item)[cut:]
            if name and ".tmp-" not in name and info.get("type", "file") != "directory":
                out[name] = info
        return out

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every key under `prefix` (one listing, no reads), relative to the run root."""
        return {key: int(info.get("size") or 0) for key, info in self.info_all(prefix).items()}

    def is_file(self) -> bool:
        """Whether the root itself is a file (a source given as one tar shard)."""
        return bool(self._retry("isfile", "", lambda: self.fs.isfile(self._root)))

    def top_level(self) -> list[str]:
        """Names directly under the root."""
        try:
            found = self._retry("ls", "", lambda: self.fs.ls(self._root, detail=False))
        except FileNotFoundError:
            return []
        return sorted(str(item).rstrip("/").rsplit("/", 1)[-1] for item in found)

    def open_read(self, key: str):
        """A binary file object for streaming reads (hashing large files). Local files open through the OS:
        fsspec's open costs as much as hashing a small image."""
        if self.protocol == "file":
            return open(self._path(key), "rb")
        return self.fs.open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return bool(self._retry("exists", key, lambda: self.fs.exists(path)))

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (recursive), relative to the run root, sorted."""
        base = self._path(prefix.rstrip("/")) if prefix else self._root
        try:
            found = self._retry("list", prefix, lambda: self.fs.find(base))
        except FileNotFoundError:
            return []
        if self.protocol == "memory":
            found = ["/" + item.lstrip("/") for item in found]
        cut = len(self._root) + 1
        return sorted(item[cut:] for item in found if ".tmp-" not in item[cut:])

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.exists(key):
            self._retry("delete", key, lambda: self.fs.rm(path, recursive=True))

    # ---- commit protocol ----------------------------------------------------------------------------
    def put_payload(self, key: str, data: bytes) -> FileRef:
        """Write an immutable payload. Rewriting identical bytes is a no-op; different bytes raise."""
        digest = sha256_bytes(data)
        if self.exists(key):
            if sha256_bytes(self.read_bytes(key)) == digest:
                return FileRef(path=key, sha256=digest, size=len(data))
            raise StoreError(f"{key}: payloads are immutable and this key already holds other content")
        self.write_bytes(key, data)
        return FileRef(path=key, sha256=digest, size=len(data))

    def copy_payload(self, ref: FileRef, dest: RunStore, key: str) -> FileRef:
        """`ref` copied to `key` in `dest`, server-side where both stores are one filesystem (S3 CopyObject,
        a local file copy renamed into place), so no weights pass through this process; the copy is
        verified against the same size and sha256 when it is read, like any payload."""
        if dest.protocol != self.protocol or self.protocol == "memory":
            return dest.put_payload(key, self.get_payload(ref))
        if not dest.exists(key):
            source, target = self._path(ref.path), dest._path(key)

            def copy() -> None:
                if self.protocol == "file":
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
                else:
                    self.fs.copy(source, target)

            self._retry("copy", key, copy)
        return FileRef(path=key, sha256=ref.sha256, size=ref.size)

    def child(self, prefix: str) -> RunStore:
        """The store rooted at `prefix` inside this one: a stage that keeps the run layout of its own."""
        self._path(prefix)  # a relative path, no '..'
        return RunStore(f"{self.url}/{prefix.strip('/')}", self.config)

    def get_payload(self, ref: FileRef) -> bytes:
        data = self.read_bytes(ref.path)
        if len(data) != ref.size:
            raise IntegrityError(f"{ref.path}: size {len(data)} != recorded {ref.size} (truncated or altered payload)")
        digest = sha256_bytes(data)
        if digest != ref.sha256:
            raise IntegrityError(f"{ref.path}: sha256 {digest[:12]}… != recorded {ref.sha256[:12]}… (altered payload)")
        return data

    def commit(self, key: str, record: BaseModel) -> None:
        """Write a record. Call it only after every payload it lists has been written."""
        self.write_bytes(key, record.model_dump_json(indent=2).encode())

    def read_record(self, key: str, cls: type[R]) -> R | None:
        """The committed record at `key`, or None if it is not committed."""
        try:
            raw = self.read_bytes(key)
        except FileNotFoundError:
            return None
        try:
            return cls.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"{key}: {where}: {first['msg'].removeprefix('Value error, ')}") from None

    def local_copy(self, ref: FileRef) -> Path:
        """A verified local file for `ref`, cached by sha256 (so re-reads cost no download)."""
        if self.protocol == "file":
            self.get_payload(ref)  # verify in place; hashing is far cheaper than training on bad data
            return Path(self._path(ref.path))
        cache = Path(self.config.cache_dir or Path.home() / ".cache" / "ddm") / ref.sha256[:2]
        target = cache / f"{ref.sha256}{Path(ref.path).suffix}"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(self.get_payload(ref))
            os.replace(tmp, target)
        return target

    def scoped(self, prefixes: Sequence[str], read_only: Sequence[str] = ()) -> ScopedStore:
        """A view that may read and write under `prefixes` and only read under `read_only`."""
        return ScopedStore(self.url, self.config, prefixes, read_only)


class ScopedStore(RunStore):
    """A RunStore limited to some prefixes. Every access is checked and logged."""

    def __init__(self, url: str, config: StorageConfig, prefixes: Iterable[str], read_only: Iterable[str] = ()) -> None:
        super().__init__(url, config)
        self.prefixes = tuple(p.rstrip("/") + "/" if p else "" for p in prefixes)
        self.read_only = tuple(p.rstrip("/") + "/" if p else "" for p in read_only)
        self.access_log: list[tuple[str, str]] = []

    def _check(self, key: str, write: bool) -> None:
        allowed = self.prefixes if write else self.prefixes + self.read_only
        if not any(key == p.rstrip("/") or key.startswith(p) for p in allowed):
            mode = "write" if write else "read"
            raise ScopeError(f"{key}: {mode} outside this job's scope {list(allowed)}")
        self.access_log.append(("write" if write else "read", key))

    def read_bytes(self, key: str) -> bytes:
        self._check(key, write=False)
        return super().read_bytes(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._check(key, write=True)
        super().write_bytes(key, data)

    def append_text(self, key: str, text: str) -> None:
        self._check(key, write=True)
        super().append_text(key, text)

    def exists(self, key: str) -> bool:
        self._check(key, write=False)
        return super().exists(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self._check(key, write=True)
        return super().create_exclusive(key, data)

    def info_all(self, prefix: str = "") -> dict[str, dict]:
        self._check(prefix.rstrip("/") + "/", write=False)
        return super().info_all(prefix)

    def list(self, prefix: str = "") -> list[str]:
        self._check(prefix.rstrip("/") + "/", write=False)
        return super().list(prefix)

    def delete(self, key: str) -> None:
        self._check(key, write=True)
        super().delete(key)

    def local_copy(self, ref: FileRef) -> Path:
        self._check(ref.path, write=False)
        return super().local_copy(ref)

    def scoped(self, prefixes: Sequence[str], read_only: Sequence[str] = ()) -> ScopedStore:
        for p in list(prefixes) + list(read_only):
            self._check(p.rstrip("/") + "/", write=p in prefixes)
        return ScopedStore(self.url, self.config, prefixes, read_only)


def open_store(url: str, config: StorageConfig | None = None) -> RunStore:
    return RunStore(url, config)


def read_json(store: RunStore, key: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(key))
    except FileNotFoundError:
        return None

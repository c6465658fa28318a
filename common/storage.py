"""The run store: one fsspec root per run, with the commit protocol of docs/design.md §4.

- Payloads are immutable: `put_payload` refuses to overwrite a key with different content.
- A record (small JSON) listing payloads with their sha256 is written last; readers trust only
  records, and `get_payload` verifies size and sha256 on every read.
- `scoped(prefixes)` returns a view that raises `ScopeError` for any key outside its prefixes;
  expert jobs only ever receive such a view.
Credentials are never taken from, or written to, the config: s3fs reads the AWS environment/chain.
"""

from __future__ import annotations

from common.errors import DDMError, UsageError

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import fsspec
from pydantic import BaseModel, ValidationError

from common.config import StorageConfig
from common.manifests import FileRef, ManifestError, check_relative_path

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


class StoreError(DDMError, RuntimeError):
    """A storage operation that failed for good; the message names the key."""


class IntegrityError(StoreError):
    """A payload whose size or sha256 does not match its record."""


class ScopeError(DDMError, PermissionError):
    """Access to a key outside a scoped view's prefixes."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                        PermissionError, ScopeError, IntegrityError)):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "Throttl" in type(exc).__name__


def normalize_url(url: str) -> str:
    """Local paths become absolute file:// URLs so other processes resolve them identically."""
    if "://" not in url:
        return "file://" + str(Path(url).expanduser().resolve())
    return url.rstrip("/")


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
                options = {"client_kwargs": client_kwargs, "use_listings_cache": False, "skip_instance_cache": True}
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
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
                if not _is_transient(exc) or attempt == self.config.retries:
                    raise
                log.warning("%s %s: transient %s, retry %d/%d in %.1fs", what, key, type(exc).__name__,
                            attempt + 1, self.config.retries, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

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
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
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

    def scoped(self, prefixes: Sequence[str], read_only: Sequence[str] = ()) -> "ScopedStore":
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

    def list(self, prefix: str = "") -> list[str]:
        self._check(prefix.rstrip("/") + "/", write=False)
        return super().list(prefix)

    def delete(self, key: str) -> None:
        self._check(key, write=True)
        super().delete(key)

    def local_copy(self, ref: FileRef) -> Path:
        self._check(ref.path, write=False)
        return super().local_copy(ref)

    def scoped(self, prefixes: Sequence[str], read_only: Sequence[str] = ()) -> "ScopedStore":
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

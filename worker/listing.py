"""The content listing of a data source: what prepare may read, identified by content, never by time.

    listing = list_source(config.data, config.storage, previous=None)   # SourceListing
    listing.items          # [ListedItem(key, size, etag, mtime)], sorted by key
    listing.fingerprint()  # sha256 over (key, size, etag) of every item: the source's identity

Per item: `key` relative to the source root, `size`, and `etag`: the object store's ETag (s3://, gcs://),
or `sha256:<hex>` of the bytes for local and in-memory files. A local file is re-hashed only when its
size or mtime differs from `previous` (the listing committed at prepare), so touching or copying files
without their times costs one hash each but never changes the identity. Only files prepare can read
are listed (images, tar shards, caption sidecars when `data.captions`, the labels file), so a README or
notes.txt beside the data changes nothing. A missing source, or one with nothing to read, raises
SourceError (one line); built-in sources have an empty listing (their config is their identity).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from common.config import DataConfig, StorageConfig
from common.storage import RunStore
from worker.decode import IMAGE_EXTENSIONS
from worker.sources import SourceError

LISTING_KEY = "data/listing.jsonl"  # committed by the prepare stage, listed in its record
HASH_CHUNK = 4 * 2**20


@dataclass(frozen=True)
class ListedItem:
    key: str                    # relative to the source root, POSIX
    size: int
    etag: str                   # object-store ETag, or "sha256:<hex>"
    mtime: float | None = None  # local files: a hint for re-hashing, not part of the identity


@dataclass
class SourceListing:
    source: str
    items: list[ListedItem] = field(default_factory=list)
    single_file: bool = False         # the source is one tar shard: keys are relative to its folder
    seconds: float | None = None      # how long listing (and hashing) took, for the prepare record

    def sizes(self) -> dict[str, int] | None:
        """{key relative to the source: size}, what discovery would find by walking the source; None for a
        single-shard source, whose keys are relative to its folder instead."""
        return None if self.single_file else {item.key: item.size for item in self.items}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.key}\0{item.size}\0{item.etag}\n".encode())
        return h.hexdigest()

    def to_jsonl(self) -> bytes:
        # Keys in sorted order, as json.dumps(asdict(item), sort_keys=True) writes them, without asdict's deep copy.
        return "".join(json.dumps({"etag": i.etag, "key": i.key, "mtime": i.mtime, "size": i.size}) + "\n"
                       for i in self.items).encode()

    @classmethod
    def from_jsonl(cls, source: str, raw: bytes) -> SourceListing:
        return cls(source, [ListedItem(**json.loads(line)) for line in raw.decode().splitlines() if line.strip()])

    def changes_since(self, old: SourceListing) -> str:
        """What differs from `old`, e.g. '2 added (a.png, b.png), 1 changed (c.png)'; '' when identical."""
        before = {i.key: (i.size, i.etag) for i in old.items}
        now = {i.key: (i.size, i.etag) for i in self.items}
        parts = []
        for what, keys in (("added", sorted(now.keys() - before.keys())),
                           ("removed", sorted(before.keys() - now.keys())),
                           ("changed", sorted(k for k in now.keys() & before.keys() if now[k] != before[k]))):
            if keys:
                shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {what} ({shown})")
        return ", ".join(parts)


def is_builtin(data: DataConfig) -> bool:
    return data.source.startswith("builtin:")


def _readable(key: str, data: DataConfig) -> bool:
    """Files prepare may read (worker/sources.py); anything else beside the data is not its input."""
    low = key.lower()
    if low.endswith(IMAGE_EXTENSIONS) or low.endswith(".tar") or key == data.labels_file:
        return True
    return data.captions and low.endswith((".txt", ".json"))


@dataclass
class SourceWalk:
    """The readable files of a source, walked but not yet hashed (walk_source, then hash_walk)."""
    source: RunStore
    files: dict[str, tuple[int, float | None, str | None]]  # readable files only: key -> (size, mtime, ETag)
    single_file: bool
    started: float  # perf_counter at the walk's start: the listing's seconds count walk and hashing


def walk_source(data: DataConfig, storage: StorageConfig | None = None) -> SourceWalk:
    """One walk of the source; a missing source or one with nothing prepare reads is one line, in the
    time of that walk (the hashing, the slow part, is hash_walk)."""
    start = time.perf_counter()
    source, single_file = RunStore(data.source, storage), False
    try:
        found = source.info_all()
    except FileNotFoundError:
        found = {}
    if not found and source.is_file():  # a single tar shard as the source
        name = source.url.rsplit("/", 1)[1]
        parent = RunStore(source.url.rsplit("/", 1)[0], storage)
        found = {name: parent.info_all(name)[name]}
        source, single_file = parent, True
    elif not found:
        raise SourceError(f"data.source {data.source}: not found (or empty)")
    files = {k: _stat(found[k]) for k in sorted(found) if _readable(k, data)}
    del found  # fsspec's info dicts: about 0.6 KB per file, held only for the walk
    if not files:
        raise SourceError(f"data.source {data.source}: no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards "
                          f"found")
    return SourceWalk(source, files, single_file, start)


def _stat(info: dict) -> tuple[int, float | None, str | None]:
    """(size, mtime, ETag) from an fsspec info dict (S3 and GCS name the ETag differently)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = info.get("mtime")
    return int(info.get("size") or 0), float(mtime) if mtime is not None else None, str(etag).strip('"') if etag else None


def hash_walk(data: DataConfig, walk: SourceWalk, previous: SourceListing | None = None) -> SourceListing:
    """The walked files' content listing: ETags where the store has them, else sha256, re-hashing only
    local files whose size or mtime changed since `previous`."""
    known = {item.key: item for item in (previous.items if previous else [])}
    items = []
    for key, (size, mtime, etag) in walk.files.items():
        if etag:
            items.append(ListedItem(key, size, etag))
            continue
        old = known.get(key)
        if old is not None and old.size == size and old.mtime == mtime and mtime is not None:
            items.append(ListedItem(key, size, old.etag, mtime))
            continue
        items.append(ListedItem(key, size, "sha256:" + _sha256(walk.source, key), mtime))
    return SourceListing(data.source, items, walk.single_file, round(time.perf_counter() - walk.started, 3))


def list_source(data: DataConfig, storage: StorageConfig | None = None,
                previous: SourceListing | None = None) -> SourceListing:
    """The source's content listing; re-hashes only local files whose size or mtime changed."""
    if is_builtin(data):
        return SourceListing(data.source)
    return hash_walk(data, walk_source(data, storage), previous)


def _sha256(source: RunStore, key: str) -> str:
    h = hashlib.sha256()
    with source.open_read(key) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


HASH_CACHE_KEY = "cache/source_listing.jsonl"  # not committed: mtimes seen last, so a touch is hashed once


def read_committed_listing(store: RunStore, data: DataConfig) -> SourceListing | None:
    """The listing the prepare stage committed (None before the first prepare)."""
    try:
        return SourceListing.from_jsonl(data.source, store.read_bytes(LISTING_KEY))
    except FileNotFoundError:
        return None


def read_hash_cache(store: RunStore, data: DataConfig) -> SourceListing | None:
    """The last listing seen (a re-hashing hint only: identity always comes from the hashes)."""
    try:
        return SourceListing.from_jsonl(data.source, store.read_bytes(HASH_CACHE_KEY))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def update_hash_cache(store: RunStore, listing: SourceListing, seen: SourceListing | None) -> None:
    """Remember this listing's mtimes when they differ from the hint used, so the next run re-hashes nothing."""
    if seen is None or [(i.key, i.mtime) for i in seen.items] != [(i.key, i.mtime) for i in listing.items]:
        store.write_bytes(HASH_CACHE_KEY, listing.to_jsonl())


def commit_listing(store: RunStore, listing: SourceListing):
    """Write the listing as an immutable payload (after prepare cleared data/); returns its FileRef."""
    return store.put_payload(LISTING_KEY, listing.to_jsonl())

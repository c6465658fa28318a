"""The source's content listing: identity by content (ETag or sha256), never by mtime or location."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

import worker.listing as listing_mod
from common.config import DataConfig
from worker.listing import list_source
from worker.sources import SourceError


def _folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        (root / str(i % 2) / f"{i}.png").write_bytes(b"\x89PNG fake " + bytes([i]) * (10 + i))
    return root


def test_touch_copy_and_notes_keep_the_identity_and_touch_costs_one_hash(tmp_path, monkeypatch) -> None:
    src = _folder(tmp_path / "src")
    first = list_source(DataConfig(source=str(src)))
    hashed: list[str] = []
    real = listing_mod._sha256
    monkeypatch.setattr(listing_mod, "_sha256", lambda store, key: hashed.append(key) or real(store, key))
    assert list_source(DataConfig(source=str(src)), previous=first).fingerprint() == first.fingerprint()
    assert hashed == []  # nothing changed: nothing re-read
    os.utime(src / "0" / "0.png", (1e9, 1e9))
    (src / "notes.txt").write_text("a note beside the data")
    touched = list_source(DataConfig(source=str(src)), previous=first)
    assert touched.fingerprint() == first.fingerprint() and hashed == ["0/0.png"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved, copy_function=shutil.copyfile)  # new location, new times
    assert list_source(DataConfig(source=str(moved))).fingerprint() == first.fingerprint()


def test_content_edits_change_the_identity_and_are_named(tmp_path) -> None:
    src = _folder(tmp_path / "src")
    first = list_source(DataConfig(source=str(src)))
    (src / "1" / "1.png").write_bytes(b"\x89PNG other content!!")
    (src / "0" / "9.png").write_bytes(b"\x89PNG new")
    now = list_source(DataConfig(source=str(src)), previous=first)
    assert now.fingerprint() != first.fingerprint()
    assert now.changes_since(first) == "1 added (0/9.png), 1 changed (1/1.png)"


def test_missing_or_empty_source_is_an_error_not_an_empty_dataset(tmp_path) -> None:
    with pytest.raises(SourceError, match="not found"):
        list_source(DataConfig(source=str(tmp_path / "gone")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(SourceError, match="no images"):
        list_source(DataConfig(source=str(tmp_path / "empty")))


def test_object_store_items_use_their_etag(s3_endpoint) -> None:
    import fsspec

    root = f"s3://ddm-test/src-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.pipe({f"{root}/a/{i}.png": bytes([i]) * 20 for i in range(3)})
    listed = list_source(DataConfig(source=root))
    assert [i.key for i in listed.items] == ["a/0.png", "a/1.png", "a/2.png"]
    assert all(not i.etag.startswith("sha256:") and len(i.etag) == 32 for i in listed.items)


def test_listing_lines_are_the_dataclass_in_sorted_key_order(tmp_path) -> None:
    """The committed listing's bytes: one sorted-key JSON object per item (what readers parse back)."""
    import json
    from dataclasses import asdict

    listing = list_source(DataConfig(source=str(_folder(tmp_path / "src"))))
    expected = "".join(json.dumps(asdict(i), sort_keys=True) + "\n" for i in listing.items).encode()
    assert listing.to_jsonl() == expected
    assert listing_mod.SourceListing.from_jsonl(listing.source, expected).items == listing.items
    assert listing.seconds is not None and listing.sizes() == {i.key: i.size for i in listing.items}

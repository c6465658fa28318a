"""The run store's contract on file://, memory:// and a real S3 endpoint (moto server over HTTP)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from common.config import StorageConfig
from common.manifests import ExpertManifest, FileRef, ManifestError, ShardRef, StageRecord
from common.storage import IntegrityError, RunStore, ScopeError, StoreError


class Note(BaseModel):
    files: list[FileRef]


def test_payload_without_record_is_invisible(store_url: str) -> None:
    store = RunStore(store_url)
    ref = store.put_payload("stage/payload.bin", b"abc")
    assert store.read_record("stage/record.json", Note) is None  # payload written, record not: nothing
    store.commit("stage/record.json", Note(files=[ref]))
    record = store.read_record("stage/record.json", Note)
    assert record is not None and store.get_payload(record.files[0]) == b"abc"


def test_payloads_are_immutable(store_url: str) -> None:
    store = RunStore(store_url)
    store.put_payload("a.bin", b"one")
    store.put_payload("a.bin", b"one")  # same bytes: idempotent
    with pytest.raises(StoreError, match="a.bin: payloads are immutable"):
        store.put_payload("a.bin", b"two")


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_corrupted_payload_is_detected(store_url: str, damage: str) -> None:
    store = RunStore(store_url)
    ref = store.put_payload("data/shard.safetensors", b"x" * 100)
    bad = b"x" * 50 if damage == "truncate" else b"x" * 99 + b"y"
    store.write_bytes("data/shard.safetensors", bad)  # simulate bit rot / a torn upload
    with pytest.raises(IntegrityError, match="data/shard.safetensors"):
        store.get_payload(ref)


@pytest.mark.parametrize("path", ["../escape.bin", "s3://other-bucket/x.bin", "/etc/passwd", "a/../../b", "file:///tmp/x"])
def test_manifest_with_unsafe_path_is_refused(store_url: str, path: str) -> None:
    store = RunStore(store_url)
    raw = ('{"schema_version": 1, "expert": 0, "num_experts": 1, "rows": 1, "latent_shape": [1, 2, 2], '
           f'"shards": [{{"path": "{path}", "sha256": "{"0" * 64}", "size": 1, "rows": 1}}]}}')
    store.write_bytes("experts/00/manifest.json", raw.encode())
    with pytest.raises(ManifestError, match="experts/00/manifest.json"):
        store.read_record("experts/00/manifest.json", ExpertManifest)


def test_unknown_field_and_bad_version_refused(store_url: str) -> None:
    store = RunStore(store_url)
    store.write_bytes("stages/x.json", b'{"schema_version": 1, "stage": "x", "fingerprint": "f", "started_at": "",'
                      b' "finished_at": "", "duration_s": 0, "surprise": 1}')
    with pytest.raises(ManifestError, match="surprise"):
        store.read_record("stages/x.json", StageRecord)
    store.write_bytes("stages/y.json", b'{"schema_version": 9, "stage": "y", "fingerprint": "f", "started_at": "",'
                      b' "finished_at": "", "duration_s": 0}')
    with pytest.raises(ManifestError, match="schema_version"):
        store.read_record("stages/y.json", StageRecord)


def test_scoped_view_refuses_outside_keys(store_url: str) -> None:
    store = RunStore(store_url)
    store.put_payload("experts/01/data/0.bin", b"mine")
    store.put_payload("experts/02/data/0.bin", b"theirs")
    view = store.scoped(["experts/01/"], read_only=["clusters/"])
    assert view.read_bytes("experts/01/data/0.bin") == b"mine"
    view.put_payload("experts/01/out.bin", b"ok")
    with pytest.raises(ScopeError, match="experts/02/data/0.bin: read outside"):
        view.read_bytes("experts/02/data/0.bin")
    with pytest.raises(ScopeError, match="write outside"):
        view.put_payload("clusters/x.bin", b"no")
    with pytest.raises(ScopeError):
        view.list("experts/")
    with pytest.raises(ScopeError):  # a narrower view cannot widen itself
        view.scoped(["experts/02/"])
    assert ("read", "experts/01/data/0.bin") in view.access_log


def test_thousand_plus_keys_list_correctly(store_url: str) -> None:
    store = RunStore(store_url)
    if store.protocol == "s3":  # one PUT each over HTTP: batch through the filesystem's bulk API
        store.fs.pipe({store._path(f"many/{i:05d}.bin"): b"." for i in range(1100)})
    else:
        for i in range(1100):
            store.write_bytes(f"many/{i:05d}.bin", b".")
    keys = store.list("many/")
    assert keys == [f"many/{i:05d}.bin" for i in range(1100)]
    assert store.list("nothing-here/") == []


def test_local_copy_is_verified_and_cached(store_url: str, tmp_path: Path) -> None:
    store = RunStore(store_url, StorageConfig(cache_dir=str(tmp_path / "cache")))
    ref = store.put_payload("data/a.bin", b"payload")
    assert store.local_copy(ref).read_bytes() == b"payload"
    bad = ShardRef(path="data/a.bin", sha256="0" * 64, size=7, rows=1)
    with pytest.raises(IntegrityError):
        store.local_copy(bad)


def test_store_survives_pickling(store_url: str) -> None:
    import pickle

    store = RunStore(store_url)
    store.write_bytes("k.txt", b"v")
    if store.protocol != "memory":  # memory:// is per process by design
        assert pickle.loads(pickle.dumps(store)).read_bytes("k.txt") == b"v"
    view = pickle.loads(pickle.dumps(store.scoped(["k/"])))
    with pytest.raises(ScopeError):
        view.read_bytes("k.txt")


def test_transient_errors_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    store = RunStore(str(tmp_path), StorageConfig(retries=3, backoff_s=0.0))
    store.write_bytes("x.bin", b"1")
    calls = {"n": 0}
    real = store.fs.cat_file

    def flaky(path, *a, **k):
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("connection reset")
        return real(path, *a, **k)

    monkeypatch.setattr(store.fs, "cat_file", flaky)
    with caplog.at_level(logging.WARNING):
        assert store.read_bytes("x.bin") == b"1"
    assert calls["n"] == 3 and "retry 1/3" in caplog.text
    calls["n"] = -10  # now fails more often than the retry budget allows
    with pytest.raises(ConnectionError):
        store.read_bytes("x.bin")


def test_secret_never_stored_or_logged(s3_endpoint: str, caplog, capfd) -> None:
    from common.config import resolve_config
    from tests.conftest import S3_SECRET

    config = resolve_config("digits", overrides=["run_uri=s3://ddm-test/secret-check"])
    store = RunStore(config.run_uri, config.storage)
    with caplog.at_level(logging.DEBUG):
        store.commit("run.json", Note(files=[store.put_payload("a.bin", b"1")]))
        store.write_bytes("config.yaml", config.model_dump_json().encode())
        keys = store.list("")
        blobs = [store.read_bytes(k) for k in keys]
    assert keys and all(S3_SECRET.encode() not in b for b in blobs)
    out, err = capfd.readouterr()
    assert S3_SECRET not in caplog.text and S3_SECRET not in out + err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == S3_SECRET  # the secret was live during the test

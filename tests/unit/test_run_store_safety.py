"""Cases 2 and 7: a run store is recognisable (marker first, foreign folders refused), and a storage
outage is retried up to a deadline, then one line (no traceback)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from common.config import StorageConfig
from common.storage import RunStore, StoreUnavailable
from orchestrator.cli import main


def test_a_folder_that_is_not_a_run_store_is_refused_untouched(tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    for sub in ("data", "experts", "clusters"):
        (home / sub).mkdir(parents=True)
        (home / sub / "thesis.tex").write_text("years of work")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    code = main(["run", "--run", str(home), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a DDM run store" in err
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


def test_empty_run_uri_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    code = main(["run", "--set", "run_uri=", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "run_uri" in err and len(err.splitlines()) == 1
    assert (tmp_path / "data" / "keep.txt").exists() and not (tmp_path / "run.json").exists()


def test_a_new_store_is_created_by_its_marker_first(tmp_path: Path) -> None:
    from common.config import resolve_config
    from orchestrator.pipeline import open_run_store

    config = resolve_config("digits", overrides=[f"run_uri={tmp_path / 'new'}"])
    store = open_run_store(config)
    assert store.list("") == ["run.json"]
    assert open_run_store(config).url == store.url  # an existing run store opens


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_errors_from_botocore_are_retried(tmp_path: Path, monkeypatch, caplog) -> None:
    from botocore.exceptions import EndpointConnectionError

    store = RunStore(str(tmp_path), StorageConfig(backoff_s=0.0))
    store.write_bytes("x.bin", b"1")
    calls = {"n": 0}
    real = store.fs.cat_file

    def flaky(path, *a, **k):
        calls["n"] += 1
        if calls["n"] < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return real(path, *a, **k)

    monkeypatch.setattr(store.fs, "cat_file", flaky)
    with caplog.at_level(logging.WARNING):
        assert store.read_bytes("x.bin") == b"1"
    assert calls["n"] == 3 and "transient EndpointConnectionError" in caplog.text


@pytest.mark.parametrize("code,status,transient", [("SlowDown", 503, True), ("InternalError", 500, True),
                                                   ("Throttling", 400, True), ("AccessDenied", 403, False)])
def test_5xx_and_throttling_are_transient_refusals_are_not(code: str, status: int, transient: bool) -> None:
    from botocore.exceptions import ClientError

    from common.storage import _is_transient

    err = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    wrapped = OSError(5, "wrapped by s3fs")
    wrapped.__cause__ = err
    assert _is_transient(err) is transient and _is_transient(wrapped) is transient


def test_outage_past_the_deadline_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = _closed_port()
    store = RunStore("s3://ddm-test/outage", StorageConfig(endpoint_url=f"http://127.0.0.1:{port}",
                                                           retry_deadline_s=1.0, backoff_s=0.1))
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"kept failing .*EndpointConnectionError.*rerun the same command") as info:
        store.read_bytes("run.json")
    assert time.monotonic() - t0 < 60 and "\n" not in str(info.value)


def test_ddm_run_during_an_outage_exits_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    code = main(["run", "--run", "s3://ddm-test/outage", "--quiet", "--set",
                 f"storage.endpoint_url=http://127.0.0.1:{_closed_port()}", "--set", "storage.retry_deadline_s=1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "rerun the same command to resume" in err

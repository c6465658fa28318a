"""Every user-facing failure is one `error: ...` line on stderr with the right exit code, never a traceback.

The CLI runs in a subprocess (`python -m orchestrator`), exactly as a user meets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import EXIT_FAILURE, EXIT_USAGE, DDMError, UsageError
from tests.integration.ensemble_runs import gathered_digits

ROOT = Path(__file__).resolve().parents[2]


def ddm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    import re

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert re.search(pattern, errors[0]), errors[0]


def test_hierarchy_carries_exit_codes():
    from common.config import ConfigError
    from common.manifests import ManifestError
    from common.storage import IntegrityError, ScopeError, StoreError
    from worker.sources import SourceError

    assert issubclass(ConfigError, UsageError) and ConfigError("x").exit_code == EXIT_USAGE
    assert SourceError("x").exit_code == EXIT_USAGE
    for cls in (StoreError, IntegrityError, ScopeError, ManifestError):
        assert issubclass(cls, DDMError) and cls("x").exit_code == EXIT_FAILURE


@pytest.mark.parametrize("source", ["missing", "empty"])
def test_missing_or_empty_source(tmp_path, source):
    folder = tmp_path / "images"
    if source == "empty":
        folder.mkdir()
    proc = ddm("run", "--run", str(tmp_path / "run"), "--until", "prepare", "--quiet",
               "--set", f"data.source={folder}", "--set", "data.label_source=none", "--set", "clustering.num_experts=1")
    assert_one_line(proc, EXIT_USAGE, r"data\.source|" + str(folder))


def test_no_usable_items_is_a_run_failure(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.png").write_bytes(b"not an image")
    proc = ddm("run", "--run", str(tmp_path / "run"), "--until", "prepare", "--quiet", "--set", "prepare.num_workers=1",
               "--set", f"data.source={folder}", "--set", "data.label_source=none", "--set", "clustering.num_experts=1")
    assert_one_line(proc, EXIT_FAILURE, r"none of the 3 discovered items is usable")


def test_binary_config_file(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    assert_one_line(ddm("config", "show", "--config", str(bad)), EXIT_USAGE, r"config\.yaml: not a UTF-8 text file")


def test_unknown_protocol_and_not_a_run(tmp_path):
    assert_one_line(ddm("status", "foo://x"), EXIT_USAGE, r"foo://x: cannot open this storage")
    assert_one_line(ddm("status", str(tmp_path)), EXIT_USAGE, r"no run\.json \(not a DDM run store\)")


def test_integrity_and_manifest_errors_in_sample_and_status(tmp_path):
    _, store = gathered_digits(str(tmp_path / "run"))
    root = Path(store.url.removeprefix("file://"))
    weights = next((root / "experts" / "00").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, altered bytes
    proc = ddm("sample", str(root), "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert_one_line(proc, EXIT_FAILURE, r"experts/00/.*(sha256|checksum|integrity)")
    (root / "stages").mkdir(exist_ok=True)
    (root / "stages" / "prepare.json").write_text('{"stage": "prepare", "unknown_field": 1}')
    assert_one_line(ddm("status", str(root)), EXIT_FAILURE, r"stages/prepare\.json")

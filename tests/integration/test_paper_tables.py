"""benchmarks/paper_tables.py at tiny scale: real training and `ddm eval`, one JSON artefact per row, tables, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_tables  # noqa: E402


def _row(name: str, mean: float, ci: float | None) -> dict:
    return {"row": name, "metrics": {"fd": {"mean": mean, "ci95": ci}}}


def test_an_ordering_is_stated_only_where_intervals_separate():
    a, b, c = _row("a", 5.0, 1.0), _row("b", 8.0, 1.0), _row("c", 6.5, 1.0)
    assert paper_tables.separated(a, b, "fd") and not paper_tables.separated(a, c, "fd")
    assert paper_tables.orderings([b, c, a], "fd") == ["a < b"]
    assert not paper_tables.separated(_row("x", 1.0, None), _row("y", 9.0, None), "fd")  # one seed: no claim


@pytest.mark.slow  # trains five small runs in-process (no Ray) and evaluates each
def test_paper_tables_writes_an_artefact_per_row(tmp_path):
    results = tmp_path / "results"
    paper_tables.main(["--out-dir", str(tmp_path / "runs"), "--results", str(results), "--ks", "4,8",
                       "--total-nimg", "2048", "--router-nimg", "512", "--distill-nimg", "512", "--n", "24",
                       "--seeds", "2", "--steps", "2"])
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    tables = {}
    for r in rows:
        tables.setdefault(r["table"], []).append(r)
        assert len(r["config_fingerprint"]) == 64 and r["seeds"] == [0, 1] and r["num_samples"] == 24
        assert r["gflops_per_sample"] > 0 and r["train_wall_s"] > 0 and r["eval_wall_s"] > 0
        for metric in ("fd", "class_acc"):
            assert len(r["metrics"][metric]["per_seed"]) == 2 and r["metrics"][metric]["ci95"] is not None
        assert r["reference"]["fd_real_vs_target"]["n"] == 24
    assert sorted(r["row"] for r in tables["table1"]) == sorted(
        ["monolith (K = 1)", "top-1", "top-2", "full (eq. 7)", "sample", "oracle", "student (dense)"])
    assert [r["num_experts"] for r in tables["table2"]] == [1, 4, 8]
    assert {r["total_nimg"] for r in tables["table2"]} == {2048}                       # equal budget
    assert {r["router_conditioning"] for r in tables["router"]} == {"none", "class"}
    assert len({r["config_fingerprint"] for r in tables["table2"]}) == 3
    md = (results / "paper_tables.md").read_text()
    assert "python benchmarks/paper_tables.py" in md and " ± " in md and "0.95-1.00" in md
    for image in ("fd_vs_k.png", "strategies.png"):
        assert (results / image).read_bytes()[:4] == b"\x89PNG"

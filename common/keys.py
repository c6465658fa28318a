"""Job identity and run-store keys in one place: every module names a job, its prefix and its records
through these functions, never by formatting strings of its own (layout: docs/design.md §4)."""

from __future__ import annotations

import re

ROUTER = "router"
HIRES_ROOT = "hires/"  # the high-resolution stage's folder: a run store of the run's own layout, inside it
STUDENT = "student"
_EXPERT_NAME = re.compile(r"expert-(\d+)")


def job_name(k: int) -> str:
    """The expert's job name, as Ray and `ddm status` show it: 3 -> "expert-03"."""
    return f"expert-{k:02d}"


def expert_index(name: str) -> int:
    """The inverse of `job_name`: "expert-03" -> 3."""
    match = _EXPERT_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not an expert job name (expert-NN)")
    return int(match.group(1))


def expert_prefix(k: int) -> str:
    """The expert's folder in the run store: 3 -> "experts/03"."""
    return f"experts/{k:02d}"


def job_prefix(name: str) -> str:
    """The folder of a job by name: "expert-03" -> "experts/03", "router" -> "router"."""
    return name if name in (ROUTER, STUDENT) else expert_prefix(expert_index(name))


def manifest_key(prefix: str) -> str:
    return f"{prefix}/manifest.json"


def export_key(prefix: str) -> str:
    """The record that commits a job's export (EMA weights + model config)."""
    return f"{prefix}/export.json"


def status_key(prefix: str) -> str:
    return f"{prefix}/status.json"


def job_label(name: str, stage: str = "train") -> str:
    """How a job is named where stages meet (Ray dashboard actors, metrics tags, the progress view): the
    base stage's jobs by name, a later stage's with its stage: "expert-03", "hires/expert-03"."""
    return name if stage == "train" else f"{stage}/{name}"

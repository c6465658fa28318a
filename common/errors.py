"""One error hierarchy for everything a user can cause or meet.

Each error is already phrased as one line that names the key, path or field and the reason, and carries
the exit code the CLI returns: 2 for bad usage or config (the user must change what they asked for),
1 for a run that failed (the data, the store, a job). `orchestrator/cli.py` maps them in one place;
anything that is not a `DDMError` is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class DDMError(Exception):
    """Base of every user-facing error: one line, and the exit code the CLI returns for it."""
    exit_code: int = EXIT_FAILURE


class UsageError(DDMError):
    """Bad usage or bad input the user named (a flag, a path, a config field): exit 2."""
    exit_code = EXIT_USAGE


class DataError(DDMError):
    """The data cannot make a run (no usable items, ...); the quarantine report says why per item."""

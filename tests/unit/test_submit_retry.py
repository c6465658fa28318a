"""`ddm submit` against a head whose job agent is still starting: it waits and retries; other refusals are
one line at once. A stand-in client replaces the job server (the real one is in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import submit as submit_mod

ROOT = Path(__file__).resolve().parents[2]
NO_AGENT = "Request failed with status code 500: No available agent to submit job, please try again later."


class Client:
    def __init__(self, failures: list[str]) -> None:
        self.failures, self.calls = list(failures), 0

    def get_address(self) -> str:
        return "http://127.0.0.1:8265"

    def submit_job(self, **kw) -> str:
        self.calls += 1
        if self.failures:
            raise RuntimeError(self.failures.pop(0))
        return "raysubmit_1"

    def get_job_status(self, job_id: str):
        return type("Status", (), {"value": "PENDING"})()


def test_a_starting_job_agent_is_waited_for(monkeypatch, capsys) -> None:
    client = Client([NO_AGENT, NO_AGENT])
    monkeypatch.setattr(submit_mod, "connect", lambda address: client)
    monkeypatch.setattr(submit_mod.time, "sleep", lambda s: None)
    assert submit_mod.submit(None, ["--preset", "digits"], working_dir=str(ROOT), follow=False) == "PENDING"
    assert client.calls == 3 and capsys.readouterr().err.count("no job agent up yet; retrying") == 1  # one line


def test_other_refusals_and_an_agent_that_never_comes_are_one_line(monkeypatch) -> None:
    monkeypatch.setattr(submit_mod.time, "sleep", lambda s: None)
    client = Client(["Request failed with status code 400: bad runtime env"])
    monkeypatch.setattr(submit_mod, "connect", lambda address: client)
    with pytest.raises(submit_mod.SubmitError, match="refused the job: .*bad runtime env$"):
        submit_mod.submit(None, [], working_dir=str(ROOT), follow=False)
    assert client.calls == 1
    monkeypatch.setattr(submit_mod, "AGENT_WAIT_S", 0.0)
    client = Client([NO_AGENT])
    monkeypatch.setattr(submit_mod, "connect", lambda address: client)
    with pytest.raises(submit_mod.SubmitError, match="No available agent"):
        submit_mod.submit(None, [], working_dir=str(ROOT), follow=False)

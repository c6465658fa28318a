"""Terminal progress: a bar per stage and per training job on a TTY, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from orchestrator.controller import JobState, JobStatus


class ProgressView:
    def __init__(self, enabled: bool = True, line_every_s: float = 15.0) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.line_every_s = line_every_s
        self.bars: dict[str, tqdm] = {}
        self.states: dict[str, JobState] = {}
        self._last_line = 0.0

    def _print(self, text: str) -> None:
        if self.enabled:
            (tqdm.write if self.tty else print)(text, file=sys.stderr)

    def note(self, text: str) -> None:
        self._print(text)

    def stage_started(self, name: str) -> None:
        self._print(f"[{name}] running")

    def stage_done(self, name: str, skipped: bool, duration_s: float, counts: dict) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        self._print(f"[{name}] {'already committed, skipped' if skipped else f'done in {duration_s:.1f}s'}"
                    f"{': ' + shown if shown else ''}")

    def job_changed(self, state: JobState) -> None:
        self.states[state.name] = state
        if not self.tty:
            if state.status in (JobStatus.SUCCEEDED, JobStatus.FAILED) or state.retries and state.status == JobStatus.PENDING:
                self._print(f"  {state.name}@{state.island}: {state.status.value}"
                            f"{' (' + state.last_error + ')' if state.last_error and state.status != JobStatus.SUCCEEDED else ''}")
            return
        p = state.progress
        bar = self.bars.get(state.name)
        if bar is None:
            total = int(p.get("duration_nimg", 0)) or None
            bar = self.bars[state.name] = tqdm(total=total, desc=f"{state.name}@{state.island}", unit="img",
                                               unit_scale=True, position=len(self.bars), leave=True, file=sys.stderr)
        if p.get("duration_nimg") and bar.total != p["duration_nimg"]:
            bar.total = int(p["duration_nimg"])
        bar.n = int(p.get("nimg", bar.n))
        extra = {"loss": f"{p['loss']:.4f}"} if isinstance(p.get("loss"), (int, float)) else {}
        bar.set_postfix(state=state.status.value, retries=state.retries, **extra, refresh=False)
        bar.refresh()

    def refresh(self) -> None:
        if self.tty or not self.enabled or time.monotonic() - self._last_line < self.line_every_s:
            return
        self._last_line = time.monotonic()
        running = [s for s in self.states.values() if s.status == JobStatus.RUNNING]
        if running:
            parts = [f"{s.name} {int(s.progress.get('nimg', 0)):,}/{int(s.progress.get('duration_nimg', 0)):,}"
                     for s in running]
            self._print("  training: " + "; ".join(parts))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

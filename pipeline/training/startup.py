"""Where a rank's time goes before its first optimizer step, logged once by rank 0:

    time to first step: 4.9 s (python and imports 2.6, process group 0.3, model and engine 1.1,
    resume 0.0, data 0.2, tracker 0.0, first step 0.7)

The clock starts when the process started (the interpreter and the imports count too) and
each ``mark`` closes a phase. ``benchmarks/startup.py`` reads the line.
"""

from __future__ import annotations

import time

import psutil

LINE_PREFIX = "time to first step:"


class StartupClock:
    def __init__(self) -> None:
        self.started = psutil.Process().create_time()
        self._last = self.started
        self.phases: list[tuple[str, float]] = []

    @staticmethod
    def mark_on(clock: StartupClock | None, phase: str) -> None:
        """``clock.mark(phase)``, for the callers that may have no clock (in-process runs)."""
        if clock is not None:
            clock.mark(phase)

    def mark(self, phase: str) -> None:
        """Close ``phase``: the time since the previous mark (or the process start)."""
        now = time.time()
        self.phases.append((phase, now - self._last))
        self._last = now

    def line(self) -> str:
        total = self._last - self.started
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases)
        return f"{LINE_PREFIX} {total:.1f} s ({parts})"

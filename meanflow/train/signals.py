"""SIGTERM / SIGINT (preemption, Ctrl-C) as a request to checkpoint and stop after this step."""

from __future__ import annotations

import signal


class StopRequest:
    """While active (``with StopRequest() as stop:``), SIGTERM and SIGINT set ``stop.requested``
    instead of killing the process; the loop reads the flag after each step, writes a checkpoint
    and returns. The previous handlers come back on exit. Outside the main thread signals cannot
    be caught, and they are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


__all__ = ["StopRequest"]

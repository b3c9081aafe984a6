"""SIGINT and SIGTERM taken between units of work: a writer finishes the batch in hand, so every line is whole."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredSignals:
    """Records SIGINT and SIGTERM instead of acting on them, between `start` and `stop` (or as a context
    manager); the owner checks `received` after each unit of work and stops there. Only the main thread can
    take signals; elsewhere this records nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _take(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    def start(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._take) for signum in STOP_SIGNALS}
        return self

    def stop(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> DeferredSignals:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def exit_status(self) -> int | None:
        """128 + the signal's number, as a shell reports a process that the signal ended (130, 143)."""
        return None if self.received is None else 128 + self.received

"""Signals during training: SIGINT / SIGTERM ask the loop to stop at the next step boundary, and a
checkpoint being written is never cut short.

    with StopFlag() as stop, finishing(stop, latest, best, bar):
        ... if stop.stop: save and leave ...
"""

from __future__ import annotations

import contextlib
import os
import signal


class finishing:
    """Lets checkpoint writes complete and closes the progress bar, also when the loop fails or is
    interrupted (further signals wait meanwhile). After an error, a failure to close is not reported
    over it."""

    def __init__(self, signals: "StopFlag", *closables):
        self.signals, self.closables = signals, closables

    def __enter__(self):
        return self

    def __exit__(self, typ, *exc):
        with self.signals.deferred(honour=False):
            for c in self.closables:
                try:
                    if hasattr(c, "wait"):
                        c.wait()
                    c.close()
                except Exception:  # noqa: BLE001
                    if typ is None:
                        raise


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints and stops. A second
    signal stops at once (KeyboardInterrupt), except while a checkpoint is being written
    (`deferred`): then it waits until the write is complete, so a checkpoint is never cut short."""

    def __init__(self):
        self.stop = False
        self.deferring, self.pending = 0, False
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if not self.stop:
            self.stop = True
            return
        if self.deferring:  # a second signal during a checkpoint write: after the write
            if not self.pending:
                os.write(2, b"\nsignal received: stopping once the checkpoint being written is complete\n")
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self, honour: bool = True):
        """Signals wait until the block ends; honour: a second signal that came meanwhile then
        stops at once (else it is dropped: the caller is stopping anyway)."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.pending:
            self.pending = False
            if honour:
                raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)



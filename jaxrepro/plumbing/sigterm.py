"""SIGTERM (SLURM's or a TPU's preemption notice) as a flag that the main loop polls.

    with SigtermFlag() as term:
        while ...:
            if term.requested:
                ...  # checkpoint / stop the children, then leave

The previous handler is restored on exit. Outside the main thread signals cannot be
caught; there the flag simply never rises.
"""

from __future__ import annotations

import signal


class SigtermFlag:
    """A context manager whose ``requested`` becomes True when SIGTERM arrives."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

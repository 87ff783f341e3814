"""Progress of a step loop: a bar on a terminal, periodic log lines elsewhere.

``runtime.progress`` picks the form: ``auto`` (the default) draws a bar with steps/s and
ETA when stderr is a terminal and writes a log line every ``runtime.progress_every_s``
seconds when it is not (CI, SLURM and study logs); ``bar``, ``lines`` and ``off`` force
one. The bar is tqdm's: it is already installed with tensorflow-datasets, is maintained,
and does what a hand-written bar would have to redo (terminal width, smoothed rate and
ETA, log lines printed above the bar instead of through it).

The loop reports only steps whose metrics the host has already read (train/record.py
reads them in blocks of ``FETCH_BLOCK``), so progress adds no device sync, and nothing it
does reaches the computation: the trajectory's bits are the same with any form.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from jaxrepro.config import PROGRESS_MODES as MODES

log = logging.getLogger("jaxrepro")


def resolve_mode(mode: str, stream) -> str:
    """``bar``, ``lines`` or ``off``: ``auto`` is a bar on a terminal, lines elsewhere."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}; valid: {', '.join(MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "lines"
    except (OSError, ValueError):  # a closed stream
        return "lines"


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h10m``; ``?`` for unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Steps ``start .. end`` of one loop (a run's session, a replay, a diagnosis).

    Args:
      what: what runs, the line's or bar's label ("train", "replay", "diagnose 0").
      start, end: the first step this loop runs and the step it stops before.
      mode: one of ``MODES``; every_s: seconds between log lines (``lines``).
      stream: where the bar goes and what ``auto`` looks at (default: ``sys.stderr``).
      clock: seconds (tests pass a fake one).
    """

    def __init__(
        self,
        what: str,
        start: int,
        end: int,
        *,
        mode: str = "auto",
        every_s: float = 10.0,
        stream=None,
        clock=time.monotonic,
    ):
        self.what, self.start, self.end = what, int(start), int(end)
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.every_s, self.clock = float(every_s), clock
        self.step = self.start
        self.first = None  # (time, step) of the first report: rates leave compile time out
        self.last_line = None
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if self.mode == "bar":
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # no terminal behind it (tests)
            columns = 0
        # A terminal that reports no width (a bare pty) would get an empty bar: 100 columns.
        width = {"dynamic_ncols": True} if columns > 0 else {"ncols": 100, "nrows": 24}
        self.bar = tqdm(
            total=self.end,
            initial=self.start,
            desc=self.what,
            unit=" steps",
            file=self.stream,
            mininterval=0.5,
            smoothing=0.3,
            leave=True,
            **width,
        )
        # The run's own log lines (evals, drop-offs) print above the bar, not through it.
        self._redirect.enter_context(logging_redirect_tqdm([log]))

    def advance(self, step: int, note: str = "") -> None:
        """Steps before ``step`` are done (their metrics read); ``note``: phase, loss."""
        step = int(step)
        if self.mode == "off" or step <= self.step:
            return
        now = self.clock()
        if self.first is None:
            self.first = (now, step)
            self.last_line = now
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(step - self.step)
        self.step = max(self.step, step)
        if self.mode == "lines" and now - self.last_line >= self.every_s:
            self.last_line = now
            log.info("%s", self.line(now, note))

    def rate(self, now: float | None = None) -> float | None:
        """Steps/s since the first report (None before two reports a moment apart)."""
        if self.first is None:
            return None
        now = self.clock() if now is None else now
        t0, s0 = self.first
        if now <= t0 or self.step <= s0:
            return None
        return (self.step - s0) / (now - t0)

    def line(self, now: float | None = None, note: str = "") -> str:
        """``train: step 40/120 (pretrain 40/80, loss 0.4213) | 2.10 steps/s | ETA 38s``."""
        rate = self.rate(now)
        eta = (self.end - self.step) / rate if rate else None
        speed = f"{rate:.2f} steps/s" if rate else "? steps/s"
        where = f" ({note})" if note else ""
        return f"{self.what}: step {self.step}/{self.end}{where} | {speed} | ETA {duration(eta)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()

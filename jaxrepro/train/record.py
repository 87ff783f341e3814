"""The host-side record of a run: rows, drop-offs, event files, heartbeat, progress.

The loop hands each dispatched train step's metrics to ``Record.dispatched`` and each
eval's rows to ``Record.log_rows``. Train metrics are read late, in blocks: a host thread
that wakes for every step costs the step's own threads ~3 ms a step on a 2-core CPU, one
that wakes every 8 steps ~1 ms (results/bench/NOTES.md). Rows, drop-off events and the
non-finite stop do not depend on the block (``flush``); progress (jaxrepro.train.progress)
is reported as each block is read. Everything here runs on the host, off the compiled
step; only process 0 writes files and shows progress.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np

from jaxrepro import dropoff as dropoff_lib
from jaxrepro import parallel, tbevents
from jaxrepro import status as status_lib
from jaxrepro.plumbing import jsonio
from jaxrepro.train.progress import Progress
from jaxrepro.train.step import unpack_metrics
from jaxrepro.workdir import MetricsWriter

log = logging.getLogger("jaxrepro")

# The host reads the train steps' metrics in blocks of this many steps, once 2x this many
# are in flight (see the module doc).
FETCH_BLOCK = 8
_FAR_MEAN = 0.5  # fine-tune input mean this many pretrain stds away -> warn
_FAR_STD = 2.0  # fine-tune input std off by this factor -> warn


def train_row(phase, step: int, epoch, m) -> dict:
    """The metrics.jsonl row of train step ``step`` from the step's fetched metrics."""
    row = {
        "kind": "train",
        "step": step,
        "phase": phase.name,
        "phase_step": step - phase.start,
        "epoch": int(epoch),
    }
    for k in ("loss", "accuracy", "grad_norm", "update_norm", "param_norm", "lr"):
        row[k] = float(m[k])
    row["finite"] = bool(m["finite"])
    if not m["applied"]:
        row["skipped"] = True
    return row


def is_logged(phase, step: int) -> bool:
    """Whether train step ``step`` gets a row: every ``log_every``-th and the phase's last."""
    return not (step - phase.start) % phase.log_every or step == phase.end - 1


def open_metrics(ws, primary: bool, keep_before_step, restored_phase):
    """Process 0's MetricsWriter; the other hosts keep the same rows in memory only."""
    writer = None
    if primary:
        writer = MetricsWriter(ws.metrics_path, keep_before_step, restored_phase)
    parallel.sync("metrics-open")
    if writer is None:
        writer = parallel.RowMirror(jsonio.read_jsonl(ws.metrics_path))
    parallel.sync("metrics-read")  # before process 0 appends
    return writer


class Record:
    """Rows, drop-offs and event files of one session of a run, and the non-finite stop.

    Args:
      setup: the run's ``RunSetup`` (config, phases, end).
      ws: its ``Workdir``.
      start: the first step this session runs; ``how``: 'init' | 'resume' | 'origin'.
      restored_phase: the phase of the state it starts from.
      nonfinite: the non-finite steps counted so far (the state's own count).
    """

    def __init__(self, setup, ws, *, start: int, how: str, restored_phase, nonfinite):
        self.config = setup.config
        self.setup = setup
        self.ws = ws
        self.start = start
        self.primary = parallel.is_primary()
        self.block = FETCH_BLOCK
        self.metrics = open_metrics(
            ws, self.primary, None if how == "init" else start, restored_phase
        )
        self.detector = dropoff_lib.OnlineDetector(self.config.dropoff)
        # A branch judges its first steps against the original's recent past, so a
        # drop-off just after the restore step is seen as in the original run.
        history = setup.origin.history if how == "origin" else ()
        for row in [*history, *self.metrics.rows]:  # the detector: a function of the history
            self.detector.update(row)
        self.events = self._open_events(start, how)
        self.pending = collections.deque()  # (phase, step, epoch, metrics) not yet read
        self.nonfinite = nonfinite
        self.stop_at = None  # policy 'stop': the step after the first non-finite one
        self.last_train = None
        self.input_stats = {}  # phase -> [sum of means, sum of stds, count]
        self.t_first = None  # when the session's first step was done (rates count from it)
        self.last_print = 0.0
        self.next_beat = time.perf_counter() + self.config.runtime.heartbeat_every_s
        self.heartbeat(start, None)
        self.last_read = None  # (phase, step) of the last train step read
        runtime = self.config.runtime
        self.progress = Progress(
            "train" if setup.origin is None else "replay",
            start,
            setup.end,
            mode=runtime.progress if self.primary else "off",
            every_s=runtime.progress_every_s,
        )

    # -- rows
    def dispatched(self, phase, step: int, epoch: int, metrics) -> None:
        """A train step was dispatched; reads the oldest block once enough are in flight."""
        self.pending.append((phase, step, epoch, metrics))
        if len(self.pending) >= 2 * self.block:
            self.flush(self.block)  # while the newer steps compute

    def flush(self, count: int | None = None) -> None:
        """Reads the oldest ``count`` pending steps' metrics (all when None), in order, and
        writes their rows.

        Under policy 'stop' the first non-finite step ends the run's record there: its row
        is written, the steps dispatched after it (no-ops, the step guards them) are
        dropped unread, and ``stop_at`` is the step after it, however late it was read.
        """
        n = len(self.pending) if count is None else min(count, len(self.pending))
        for _ in range(n):
            self._read_one(*self.pending.popleft())
        if n and self.stop_at is None:
            self._report()

    def _report(self) -> None:
        """Progress up to the last step read: no metrics are fetched for it."""
        phase, step = self.last_read
        m = self.last_train
        note = f"{phase.name} {step + 1 - phase.start}/{phase.steps}, loss {float(m['loss']):.4f}"
        self.progress.advance(step + 1, note)

    def _read_one(self, phase, step, epoch, m):
        if self.stop_at is not None:
            return  # dispatched after the stop: a no-op step, not part of the record
        # np.asarray, not jax.device_get: on a busy CPU the latter's asynchronous copy
        # cost the host loop ~0.5 ms a step; the array is fully replicated, so the value
        # is this process's copy either way.
        m = unpack_metrics(np.asarray(m))
        self._accumulate_inputs(phase.name, m)
        self.last_train = m
        self.last_read = (phase, step)
        self.nonfinite += not m["applied"]
        if self.config.train.nonfinite_policy == "stop" and not m["finite"]:
            self.stop_at = step + 1
        # a stop's row is written whatever log_every
        if is_logged(phase, step) or self.stop_at is not None:
            self.log_rows([train_row(phase, step, epoch, m)])

    def log_rows(self, rows) -> None:
        for row in rows:
            self.metrics.write(row)
            if self.events is not None:
                self.events.add_row(row)
            for event in self.detector.update(row):
                log.warning("drop-off: %s", event)
                if self.primary:
                    dropoff_lib.write_dropoffs(self.ws.path, self.detector.events)
                if self.events is not None:
                    self.events.add_dropoff(event)

    # -- event files and heartbeat
    def _open_events(self, start: int, how: str):
        """Process 0's TensorBoard writer (None when ``runtime.tensorboard`` is off).

        Its file purges the older files' points from ``start`` on; the kept rows (and
        drop-offs) from there on are written again, or all of them into a run that had
        no event files yet (see jaxrepro.tbevents).
        """
        if not (self.primary and self.config.runtime.tensorboard):
            return None
        events = tbevents.EventWriter(self.ws.path, start)
        # A branch's first session: the original's rows are the original's events.
        lo = 0 if events.backfill and how != "origin" else start
        for row in self.metrics.rows:
            if row["step"] >= lo:
                events.add_row(row)
        for event in self.detector.events:
            # TensorBoard's restart purge keeps an older file's text at the start step itself
            # (it drops scalars there): an episode at the start step is not written twice.
            if event["step"] > lo or (event["step"] == lo and lo == 0):
                events.add_dropoff(event)
        events.flush()
        return events

    def flush_events(self) -> None:
        if self.events is not None:
            self.events.flush()

    def dropoff_steps(self) -> list[int]:
        """The onsets of the drop-offs so far, an unconfirmed episode's included (the
        checkpoint before each is kept for its replay)."""
        steps = [e["step"] for e in self.detector.events]
        pending = self.detector.pending_from()
        if pending is not None:
            steps.append(pending)
        return steps

    def stepped(self, phase, s: int) -> None:
        """Steps up to ``s`` are dispatched: event files flushed and a heartbeat when due
        (progress itself is reported as metrics are read: ``_report``).

        Rates count from the session's first step done, so its compile is not in them.
        """
        del phase
        done, now = s - self.start, time.perf_counter()
        if done == 1:
            self.t_first = now
        elif now - self.last_print > self.config.runtime.progress_every_s:
            self.last_print = now
            self.flush_events()
        if now >= self.next_beat and done > 1:  # off the hot path: every few seconds
            self.next_beat = now + self.config.runtime.heartbeat_every_s
            self.heartbeat(s, (done - 1) / max(now - self.t_first, 1e-9))

    def heartbeat(self, step: int, rate: float | None) -> None:
        """heartbeat.json: who runs this workdir, and how fast (``jaxrepro status``)."""
        if not self.primary:
            return
        self.ws.write_heartbeat(
            dict(
                status_lib.process_identity(),
                time=time.time(),
                step=int(step),
                end=int(self.setup.end),
                phase=self.setup.phase_of(step).name,
                steps_per_s=rate,
                every_s=self.config.runtime.heartbeat_every_s,
            )
        )

    def close_progress(self) -> None:
        self.progress.close()

    def close(self) -> None:
        """The metrics file and dropoffs.json final, the progress bar closed (the event
        file: ``close_events``)."""
        self.progress.close()
        self.metrics.close()
        if self.primary:
            dropoff_lib.write_dropoffs(self.ws.path, self.detector.events)

    def close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    def end_heartbeat(self, step: int, status: str) -> None:
        if self.primary:
            beat = self.ws.read_heartbeat() or {}
            self.ws.write_heartbeat(dict(beat, ended=time.time(), step=int(step), exit=status))

    def summary(self) -> dict:
        """run.json's account of the session's record: inputs, non-finite steps, drop-offs."""
        stats, warnings = self.input_report()
        return dict(
            input_stats=stats,
            warnings=warnings,
            # Counted as the steps were read: a diverged run's no-op steps after its stop
            # (dispatched before the host read the stop) are not part of its record.
            nonfinite_steps=self.nonfinite,
            dropoff_count=len(self.detector.events),
        )

    # -- input statistics
    def _accumulate_inputs(self, phase: str, m):
        acc = self.input_stats.setdefault(phase, [np.zeros(3), np.zeros(3), 0])
        acc[0] = acc[0] + np.asarray(m["input_mean"], np.float64)
        acc[1] = acc[1] + np.asarray(m["input_std"], np.float64)
        acc[2] += 1

    def input_report(self) -> tuple[dict, list[str]]:
        """Per-channel mean/std of the inputs fed in each phase, and warnings about them."""
        stats = {
            p: {
                "mean": np.round(a[0] / a[2], 4).tolist(),
                "std": np.round(a[1] / a[2], 4).tolist(),
                "batches": a[2],
            }
            for p, a in self.input_stats.items()
            if a[2]
        }
        warnings = []
        for p, s in stats.items():
            if max(abs(x) for x in s["mean"]) > 3 or not 0.1 < min(s["std"]) <= max(s["std"]) < 10:
                warnings.append(
                    f"{p} inputs look unnormalised: per-channel mean {s['mean']}, std {s['std']}"
                )
        if "pretrain" in stats and "finetune" in stats:
            a, b = stats["pretrain"], stats["finetune"]
            far = [
                c
                for c in range(3)
                if abs(b["mean"][c] - a["mean"][c]) > _FAR_MEAN * a["std"][c]
                or not 1 / _FAR_STD < b["std"][c] / a["std"][c] < _FAR_STD
            ]
            if far:
                warnings.append(
                    "fine-tune inputs' statistics are far from pretraining's (channels "
                    f"{far}): mean {b['mean']} vs {a['mean']}, std {b['std']} vs {a['std']}"
                )
        for w in warnings:
            log.warning("%s", w)
        return stats, warnings

"""A study's progress while its pool runs: one log line every ``runtime.progress_every_s``.

    study: 3/8 runs done, 2 running, 3 left | ETA 6m40s | aug3 pretrain step 40/249 \
(2.10 steps/s), aug4 starting

Runs *done* exited 0 (or had finished before this session), *failed* exited otherwise,
*skipped* could not run (a branch whose baseline failed), *left* have not started (a
branch waits for its baseline run). Each running run's phase and step come from its heartbeat.json
(written by
jaxrepro.train.record); one whose heartbeat is still the previous process's, or has none yet,
is *starting*. The ETA is of the runs, not of the analysis after them: the mean length of
the runs finished so far (their wall time as the pool saw it, process start included;
else run.json's, for runs finished before this session), the running runs' time left
from their steps/s, and the runs left placed on the pool's slots as each frees (a
branch, shorter than a whole run and tied to its baseline, counts as one more run: an
estimate).
"""

from __future__ import annotations

import heapq
import logging
import os
import time

from jaxrepro.plumbing import jsonio
from jaxrepro.train.progress import duration
from jaxrepro.workdir import Workdir

log = logging.getLogger("jaxrepro")


def running_view(beat: dict | None, pid: int | None, elapsed_s: float, now: float) -> dict:
    """What one running run is doing, from its heartbeat (None: none yet).

    ``pid``: the process the pool started (a heartbeat of another pid is a previous
    session's); ``elapsed_s``: since the pool started it. ``left_s``: its time left, from
    its steps/s (None while it has no rate yet).
    """
    view = {"elapsed_s": elapsed_s, "state": "starting", "left_s": None}
    if not beat or (pid is not None and beat.get("pid") != pid) or beat.get("ended"):
        return view
    step, end, rate = beat.get("step"), beat.get("end"), beat.get("steps_per_s")
    view.update(state="running", phase=beat.get("phase"), step=step, end=end, steps_per_s=rate)
    if rate and step is not None and end is not None:
        age = max(0.0, now - float(beat.get("time", now)))
        view["left_s"] = max(0.0, (end - step) / rate - age)
    return view


def study_eta(slots: int, running: list[dict], left: int, run_s: float | None) -> float | None:
    """Seconds until the last run ends; None when nothing tells yet.

    ``running``: ``running_view`` dicts; ``left``: runs not started; ``run_s``: the
    expected length of one run (mean of the finished ones). A running run without a rate
    is expected to take ``run_s`` in all. Runs left start on the earliest free slot.
    """
    ends = []
    for r in running:
        if r["left_s"] is not None:
            ends.append(r["left_s"])
        elif run_s is not None:
            ends.append(max(0.0, run_s - r["elapsed_s"]))
        else:
            return None
    if left and run_s is None:
        return None
    free = sorted(ends + [0.0] * max(0, slots - len(ends)))
    heapq.heapify(free)
    for _ in range(left):
        heapq.heappush(free, heapq.heappop(free) + run_s)
    return max(free, default=0.0)


def format_line(state: dict) -> str:
    """The line logged (see the module docstring); ``state`` as ``StudyProgress.state``."""
    c = state["counts"]
    head = f"study: {c['done']}/{c['total']} runs done, {c['running']} running, {c['left']} left"
    for key in ("failed", "skipped"):
        if c.get(key):
            head += f", {c[key]} {key}"
    parts = [head, f"ETA {duration(state['eta_s'])}"]
    runs = []
    for name, r in state["running"].items():
        if r["state"] != "running":
            runs.append(f"{name} starting")
            continue
        text = f"{name} {r.get('phase') or '?'} step {r.get('step')}/{r.get('end')}"
        if r.get("steps_per_s"):
            text += f" ({r['steps_per_s']:.2f} steps/s)"
        runs.append(text)
    if runs:
        parts.append(", ".join(runs))
    return " | ".join(parts)


class StudyProgress:
    """Called by the pool's wait loop (jaxrepro.study.pool); logs a line every ``every_s``.

    Args:
      out: the study's directory; names: every run of the study.
      finished_before: the runs that had finished before this session (not run again).
      parallel: the pool's slots; every_s: seconds between lines.
      clock: wall-clock seconds (tests pass a fake one).
    """

    def __init__(self, out, names, finished_before, parallel: int, every_s: float, clock=time.time):
        self.out, self.names = out, list(names)
        self.before = list(finished_before)
        self.parallel, self.every_s, self.clock = parallel, float(every_s), clock
        self.last = clock()
        self._before_s = None

    def __call__(self, pending, running, exited) -> None:
        """``pending``: names not started; ``running``: name -> (start time, pid);
        ``exited``: name -> (exit code, wall seconds)."""
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        log.info("%s", format_line(self.state(pending, running, exited, now)))

    def state(self, pending, running, exited, now: float) -> dict:
        views = {}
        for name, (t0, pid) in running.items():
            beat = Workdir(os.path.join(self.out, "runs", name)).read_heartbeat()
            views[name] = running_view(beat, pid, now - t0, now)
        done = [w for code, w in exited.values() if code == 0]
        skipped = sum(isinstance(code, str) for code, _ in exited.values())
        lengths = done or self._lengths_before()
        run_s = sum(lengths) / len(lengths) if lengths else None
        if run_s is None:  # nothing finished yet: the running runs' expected lengths
            guesses = [v["elapsed_s"] + v["left_s"] for v in views.values() if v["left_s"]]
            run_s = sum(guesses) / len(guesses) if guesses else None
        counts = {
            "total": len(self.names),
            "done": len(self.before) + len(done),
            "running": len(running),
            "left": len(pending),
            "failed": sum(code != 0 for code, _ in exited.values()) - skipped,
            "skipped": skipped,
        }
        return {
            "counts": counts,
            "running": views,
            "eta_s": study_eta(self.parallel, list(views.values()), len(pending), run_s),
        }

    def _lengths_before(self) -> list[float]:
        """run.json's wall time of the runs finished before this session (read once)."""
        if self._before_s is None:
            self._before_s = []
            for name in self.before:
                path = os.path.join(self.out, "runs", name, "run.json")
                try:
                    wall = jsonio.read_json(path).get("wall_time_s")
                except (OSError, ValueError, AttributeError):
                    continue
                if isinstance(wall, int | float) and wall > 0:
                    self._before_s.append(float(wall))
        return self._before_s

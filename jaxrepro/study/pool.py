"""The local pool: each run a separate ``jaxrepro train`` process, N at a time.

A run's output goes to OUT/logs/NAME.txt. A branch (a design's remedy arm) starts once
its baseline run has ended. SIGTERM to the study (a cluster's preemption)
is passed on to the runs, which checkpoint and exit; rerunning the study resumes them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing.sigterm import SigtermFlag
from jaxrepro.study.plan import Run, job_argv, log_path

log = logging.getLogger("jaxrepro")
WAIT = "wait"  # ready()'s answer for a run whose baseline run is still going


class StudyInterrupted(JaxreproError):
    """SIGTERM reached the study: its runs were stopped at a checkpoint."""


def _stop(running: dict) -> None:
    """SIGTERM to each run (it checkpoints and exits), then wait; kill what hangs."""
    for _, proc, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc, _ in running.values():
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_pool(
    out: str,
    runs: list[Run],
    parallel: int,
    python=None,
    env=None,
    *,
    ready=None,
    on_exit=None,
    progress=None,
) -> dict:
    """Runs ``runs`` as separate processes, ``parallel`` at a time; name -> exit code.

    ``ready(run, busy)`` (``busy``: names not yet ended) says whether a run may start:
    None (now), ``WAIT`` (a run it needs is still going), or why it cannot run at all;
    such a run is not started and its code is ``"skipped: WHY"``. ``on_exit(run, code)``
    is called as each run ends (a study frees the checkpoints it no longer needs).
    ``progress(pending, running, exited)`` is called every time round the wait loop
    (jaxrepro.study.progress): the names not started, name -> (start time, pid) of the
    running runs, name -> (code, wall seconds) of the ended or skipped ones.
    """
    pending, running, codes, exited = list(runs), {}, {}, {}
    environ = dict(os.environ, **(env or {}))
    with SigtermFlag() as term:  # a cluster's preemption stops the pool cleanly
        try:
            while pending or running:
                if term.requested:
                    raise StudyInterrupted(
                        f"SIGTERM: {len(running)} run(s) stopped at a checkpoint; "
                        "rerun the same command to resume the study"
                    )
                for run in list(pending):
                    if len(running) >= parallel:
                        break
                    busy = {r.name for r in pending} | set(running)
                    why = ready(run, busy) if ready is not None else None
                    if why == WAIT:
                        continue
                    pending.remove(run)
                    if why is not None:
                        codes[run.name] = f"skipped: {why}"
                        exited[run.name] = (codes[run.name], 0.0)
                        log.warning("study: %s not run: %s", run.name, why)
                        continue
                    with open(log_path(out, run), "a") as logf:
                        proc = subprocess.Popen(
                            job_argv(out, run, python),
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            env=environ,
                        )
                    running[run.name] = (time.time(), proc, run)
                    log.info("study: started %s (%d left to start)", run.name, len(pending))
                for name, (t0, proc, run) in list(running.items()):
                    if proc.poll() is not None:
                        codes[name] = proc.returncode
                        exited[name] = (proc.returncode, time.time() - t0)
                        del running[name]
                        log.info("study: %s exited %d after %.0fs", name, *exited[name])
                        if on_exit is not None:
                            on_exit(run, proc.returncode)
                if progress is not None:
                    progress(
                        [r.name for r in pending],
                        {n: (t0, p.pid) for n, (t0, p, _) in running.items()},
                        exited,
                    )
                time.sleep(0.2)
        finally:
            _stop(running)
    return codes

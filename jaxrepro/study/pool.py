"""The local pool: each run a separate ``jaxrepro train`` process, N at a time.

A run's output goes to OUT/logs/NAME.txt. SIGTERM to the study (a cluster's preemption)
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


class StudyInterrupted(JaxreproError):
    """SIGTERM reached the study: its runs were stopped at a checkpoint."""


def _stop(running: dict) -> None:
    """SIGTERM to each run (it checkpoints and exits), then wait; kill what hangs."""
    for _, proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc in running.values():
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_pool(out: str, runs: list[Run], parallel: int, python=None, env=None) -> dict:
    """Runs ``runs`` as separate processes, ``parallel`` at a time; name -> exit code."""
    pending, running, codes = list(runs), {}, {}
    environ = dict(os.environ, **(env or {}))
    with SigtermFlag() as term:  # a cluster's preemption stops the pool cleanly
        try:
            while pending or running:
                if term.requested:
                    raise StudyInterrupted(
                        f"SIGTERM: {len(running)} run(s) stopped at a checkpoint; "
                        "rerun the same command to resume the study"
                    )
                while pending and len(running) < parallel:
                    run = pending.pop(0)
                    with open(log_path(out, run), "a") as logf:
                        proc = subprocess.Popen(
                            job_argv(out, run, python),
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            env=environ,
                        )
                    running[run.name] = (time.time(), proc)
                    log.info("study: started %s (%d left to start)", run.name, len(pending))
                for name, (t0, proc) in list(running.items()):
                    if proc.poll() is not None:
                        codes[name] = proc.returncode
                        del running[name]
                        log.info(
                            "study: %s exited %d after %.0fs",
                            name,
                            proc.returncode,
                            time.time() - t0,
                        )
                time.sleep(0.2)
        finally:
            _stop(running)
    return codes

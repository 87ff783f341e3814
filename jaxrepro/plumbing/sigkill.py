"""A real ``kill -9`` of a training process at a chosen moment, as a node loss would.

    proc = subprocess.Popen([...])
    if not kill_when(proc, lambda: max(complete_checkpoints(ckpt_dir), default=-1) >= 4):
        ...  # it finished first: nothing was killed

Used by ``jaxrepro audit`` (its kill-and-resume check) and by the resume tests. The
process gets no chance to save, flush or clean up: whatever it had on disk at that
moment is what a resume finds.
"""

from __future__ import annotations

import os
import signal
import time


def kill_when(proc, predicate, *, timeout: float = 240.0, poll: float = 0.002) -> bool:
    """SIGKILLs ``proc`` (a ``subprocess.Popen``) the moment ``predicate()`` holds.

    Returns True once the process is killed by that signal and reaped, False if it
    ended by itself first (its ``returncode`` says how). Raises TimeoutError, after
    killing it, when the predicate has not held within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)  # an exited, unreaped process ignores it
            proc.wait()
            return proc.returncode == -signal.SIGKILL
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raise TimeoutError(f"process {proc.pid} did not reach the kill point in {timeout:.0f} s")


def complete_checkpoints(checkpoint_dir: str) -> list[int]:
    """Steps of the finished checkpoints in ``checkpoint_dir``, read from the directory
    names alone (cheap enough to poll): a save in flight lives in a
    ``*.orbax-checkpoint-tmp*`` directory and is renamed to its step when complete."""
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit())

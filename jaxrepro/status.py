"""``jaxrepro status DIR``: what a run or a study is doing, from its files alone.

A run is *finished* (run.json says done or diverged), *failed* (run.json's error),
*running*, *stale*, *stopped* or *not started*. Running or stale comes from
``heartbeat.json``, which the process that owns the workdir rewrites every
``runtime.heartbeat_every_s`` seconds (host, pid, the process's start time, step,
steps/s): on the same host the pid decides (a process that was SIGKILLed is gone, or its
pid now belongs to a process that started later); on another host the heartbeat's age
does (stale after ``3 * every_s + 60`` seconds). A process that exits on its own (SIGTERM,
an error) marks the heartbeat ``ended``. Time left is the steps left over the run's
steps/s since its first step (evals and checkpoints included).
"""

from __future__ import annotations

import os
import socket
import time

from jaxrepro import dropoff as dropoff_lib
from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import jsonio
from jaxrepro.workdir import Workdir

STUDY_FILE = "study.json"  # as jaxrepro.study.plan (not imported: status stays light)
FINISHED = ("done", "diverged")
STALE_GRACE_S = 60.0


class StatusError(JaxreproError):
    """A directory that is neither a run nor a study."""


# ----------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (the name may hold spaces), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_identity() -> dict:
    """This process as a heartbeat records it: host, pid and start time (clock ticks)."""
    fields = _stat_fields(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "proc_start": int(fields[19]) if fields else None,
    }


def process_alive(beat: dict) -> bool | None:
    """Whether the heartbeat's process still runs; None when it ran on another host."""
    if beat.get("host") != socket.gethostname():
        return None
    pid = beat.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    fields = _stat_fields(pid)
    if fields is None:
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
    if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped by its parent
        return False
    start = beat.get("proc_start")
    return start is None or int(fields[19]) == start  # else the pid was reused


# ----------------------------------------------------------------------------- one run


def run_status(workdir: str, now: float | None = None) -> dict:
    """The state of one run's workdir (see the module docstring)."""
    now = time.time() if now is None else now
    ws = Workdir(workdir)
    if not ws.exists():
        raise StatusError(f"{ws.path} is not a jaxrepro run (no config.json)")
    out = {"path": ws.path, "state": "not started", "dropoffs": []}
    try:
        info = ws.read_run()
    except (OSError, ValueError) as e:
        return dict(out, state="unreadable", error=f"{ws.run_path}: {e}")
    try:
        out["dropoffs"] = dropoff_lib.load_dropoffs(ws.path)
    except (OSError, ValueError) as e:
        out["dropoffs_error"] = str(e)
    status = info.get("status")
    out.update(status=status, step=info.get("step"), end=_end(info))
    beat = ws.read_heartbeat()
    if status in FINISHED:
        return dict(out, state="finished", wall_time_s=info.get("wall_time_s"))
    if status == "failed":
        return dict(out, state="failed", error=info.get("error"))
    if status != "running":
        return out
    if beat is None:
        return dict(out, state="unknown", note="run.json says running but there is no heartbeat")
    out.update(
        step=beat.get("step"),
        end=beat.get("end", out["end"]),
        phase=beat.get("phase"),
        steps_per_s=beat.get("steps_per_s"),
        host=beat.get("host"),
        pid=beat.get("pid"),
        heartbeat_age_s=max(0.0, now - float(beat.get("time", now))),
    )
    if beat.get("ended") is not None:
        return dict(out, state="stopped", note="exited before the end; rerun to resume")
    alive = process_alive(beat)
    if alive is None:  # another host: only the heartbeat's age can tell
        limit = 3 * float(beat.get("every_s") or 10.0) + STALE_GRACE_S
        alive = out["heartbeat_age_s"] <= limit
    if not alive:
        return dict(
            out,
            state="stale",
            note=f"process {beat.get('pid')} on {beat.get('host')} is gone (killed?); "
            "rerun the same command to resume",
        )
    out["state"] = "running"
    rate, step, end = out["steps_per_s"], out["step"], out["end"]
    if rate and step is not None and end is not None:
        out["eta_s"] = max(0.0, (end - step) / rate - out["heartbeat_age_s"])
    return out


def _end(info: dict) -> int | None:
    replay = info.get("replay") or {}
    return replay.get("until") or info.get("total_steps")


# ----------------------------------------------------------------------------- a study


def is_study(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STUDY_FILE))


def study_status(out: str, now: float | None = None) -> dict:
    """Each run's state, the counts, and the study's time left.

    The time left: the running runs' longest, plus the runs not started times the mean
    wall time of the finished ones (else the running ones' expected length), spread over
    as many slots as runs are running now (at least one).
    """
    out = os.path.abspath(out)
    try:
        study = jsonio.read_json(os.path.join(out, STUDY_FILE))
        names = list(study["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StatusError(f"{os.path.join(out, STUDY_FILE)} is unreadable: {e}") from e
    runs = {}
    for name in names:
        workdir = os.path.join(out, "runs", name)
        if os.path.isfile(os.path.join(workdir, "config.json")):
            runs[name] = run_status(workdir, now)
        else:
            runs[name] = {"path": workdir, "state": "not started", "dropoffs": []}
    counts = {}
    for r in runs.values():
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {
        "path": out,
        "runs": runs,
        "counts": counts,
        "eta_s": _study_eta(runs.values()),
        "analysed": os.path.isfile(os.path.join(out, "summary.json")),
    }


def _study_eta(runs) -> float | None:
    runs = list(runs)
    running = [r for r in runs if r["state"] == "running"]
    waiting = [r for r in runs if r["state"] in ("not started", "stale", "stopped")]
    if not running and not waiting:
        return 0.0
    lengths = [r["wall_time_s"] for r in runs if r["state"] == "finished" and r.get("wall_time_s")]
    if not lengths:
        lengths = [r["end"] / r["steps_per_s"] for r in running if r.get("steps_per_s")]
    if waiting and not lengths:
        return None
    slots = max(1, len(running))
    left = max((r.get("eta_s") or 0.0 for r in running), default=0.0)
    if waiting:
        left += len(waiting) * (sum(lengths) / len(lengths)) / slots
    return left


# ----------------------------------------------------------------------------- text


def status(path: str, now: float | None = None) -> dict:
    """``run_status`` or ``study_status`` of ``path``, whichever it is."""
    if not os.path.isdir(path):
        raise StatusError(f"{path}: no such directory")
    if is_study(path):
        return dict(study_status(path, now), kind="study")
    if os.path.isfile(os.path.join(path, "config.json")):
        return dict(run_status(path, now), kind="run")
    raise StatusError(
        f"{os.path.abspath(path)} is neither a jaxrepro run (config.json) nor a study "
        f"({STUDY_FILE})"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_line(r: dict) -> str:
    """One line about a run."""
    state = r["state"]
    parts = [state if state != "finished" else f"finished ({r.get('status')})"]
    if r.get("step") is not None and r.get("end") is not None:
        where = f"{r['phase']} " if r.get("phase") and state == "running" else ""
        parts.append(f"{where}step {r['step']}/{r['end']}")
    if state == "running":
        if r.get("steps_per_s"):
            parts.append(f"{r['steps_per_s']:.2f} steps/s")
        parts.append(f"ETA {_duration(r.get('eta_s'))}")
        parts.append(f"pid {r.get('pid')}, heartbeat {_duration(r.get('heartbeat_age_s'))} ago")
    parts.append(f"drop-offs {len(r.get('dropoffs') or [])}")
    line = " | ".join(parts)
    for key in ("error", "note", "dropoffs_error"):
        if r.get(key):
            line += f"\n    {key}: {r[key]}"
    return line


def format_status(s: dict) -> str:
    """The text ``jaxrepro status`` prints."""
    if s["kind"] == "run":
        lines = [f"run {s['path']}: {run_line(s)}"]
        for i, e in enumerate(s.get("dropoffs") or []):
            lines.append(f"    drop-off {i}: " + _event_line(e))
        return "\n".join(lines)
    c = s["counts"]
    order = ("finished", "running", "stale", "stopped", "failed", "not started")
    counts = ", ".join(f"{c[k]} {k}" for k in order if c.get(k))
    counts += "".join(f", {v} {k}" for k, v in c.items() if k not in order)
    eta = "done" if s["eta_s"] == 0 else f"ETA about {_duration(s['eta_s'])}"
    lines = [f"study {s['path']}: {len(s['runs'])} runs: {counts}; {eta}"]
    if s["analysed"]:
        lines[0] += "; analysed (report.md)"
    width = max((len(n) for n in s["runs"]), default=0)
    for name, r in s["runs"].items():
        lines.append(f"  {name:<{width}}  " + run_line(r).replace("\n", "\n  "))
    return "\n".join(lines)


def _event_line(e: dict) -> str:
    return (
        f"step {e.get('step')} {e.get('phase')} {e.get('metric')} {e.get('kind')} "
        f"{e.get('before')!s:.6} -> {e.get('after')!s:.6}"
    )

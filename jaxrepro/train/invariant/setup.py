"""The process setup that bitwise equality is conditional on, and how to recreate it.

Device-count invariance holds *within one process setup*. On CPU the setup includes
the simulated device count: measured here (INVARIANT.md), the same one-device step in a
process started with ``--xla_force_host_platform_device_count=1`` differs from the
same step in a process started with ``=8`` (a few 1e-7 relative after two steps with
``conv_impl='lax'``), although both run the same mesh of one device. The CPU thread
count (the process's CPU affinity, which sizes XLA's intra-op thread pool) is recorded
for the same reason. So to replay a run recorded with 8 simulated devices on one
device, start the replay process with the recorded flags and threads, then use a mesh
over the first device(s):

    env = setup_for_replay(run_json)      # the recorded XLA_FLAGS, JAX_PLATFORMS, threads
    subprocess.run(cmd, env=os.environ | env)
    # ...and in the new process, before its first JAX computation:
    apply_env_threads()                   # CPU affinity from $JAXREPRO_CPU_THREADS

``differences(run_json)`` says what the current process has that the record does not.
"""

from __future__ import annotations

import os
import re

from jaxrepro import machine
from jaxrepro.errors import WorkdirError
from jaxrepro.plumbing import jsonio

THREADS_ENV = "JAXREPRO_CPU_THREADS"
_COUNT_FLAG = "--xla_force_host_platform_device_count"
_COUNT_RE = re.compile(re.escape(_COUNT_FLAG) + r"=\S*")


def _platform(run_json) -> dict:
    if isinstance(run_json, (str, os.PathLike)):
        run_json = jsonio.read_json(os.fspath(run_json))
    if not isinstance(run_json, dict) or not isinstance(run_json.get("platform"), dict):
        raise ValueError("run.json has no 'platform' record (written by jaxrepro.train.runinfo)")
    platform = run_json["platform"]
    missing = [k for k in ("backend", "xla_flags", "local_device_count") if k not in platform]
    if missing:
        raise ValueError(f"run.json's platform record lacks {missing}")
    return platform


def with_device_count(xla_flags: str, count: int) -> str:
    """``xla_flags`` with exactly one ``--xla_force_host_platform_device_count=count``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"device count must be a positive int, got {count!r}")
    rest = _COUNT_RE.sub("", xla_flags or "").split()
    return " ".join([*rest, f"{_COUNT_FLAG}={count}"])


def setup_for_replay(run_json) -> dict[str, str]:
    """Environment variables that recreate a recorded run's process setup.

    Only what run.json records is applied: ``XLA_FLAGS`` as recorded (on CPU, a recorded
    ``--xla_force_host_platform_device_count`` is set to the recorded local device
    count, which wins over a stale flag; where the record has no such flag, none is
    added: a plain one-device run is replayed as it ran), ``JAX_PLATFORMS`` (the
    recorded backend) and, when recorded, ``JAXREPRO_CPU_THREADS`` (apply it with
    :func:`apply_cpu_threads` in the new process before JAX starts its backend).
    Set them before JAX is imported in the replaying process: they take effect
    when the backend starts, so a running process cannot adopt them. What the record
    does not say cannot be recreated: see :func:`not_recreated`.

    Args:
      run_json: the content of a run's ``run.json`` (a dict) or its path.

    Raises:
      ValueError: if ``run_json`` has no usable platform record.
    """
    platform = _platform(run_json)
    flags = platform["xla_flags"] or ""
    if platform["backend"] == "cpu" and _COUNT_RE.search(flags):
        flags = with_device_count(flags, int(platform["local_device_count"]))
    env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": str(platform["backend"])}
    if platform.get("cpu_threads"):
        env[THREADS_ENV] = str(int(platform["cpu_threads"]))
    return env


def not_recreated(run_json) -> list[str]:
    """Parts of a recorded setup that :func:`setup_for_replay` cannot recreate.

    A CPU run with several local devices whose recorded XLA_FLAGS do not force the count
    got its devices another way (``JAX_NUM_CPU_DEVICES``, ``jax_num_cpu_devices``) that
    run.json does not record: the replay does not invent a flag for it.
    """
    platform = _platform(run_json)
    count = int(platform["local_device_count"])
    if (
        platform["backend"] == "cpu"
        and count != 1
        and not _COUNT_RE.search(platform["xla_flags"] or "")
    ):
        return [
            f"the run had {count} CPU devices, but its recorded XLA_FLAGS do not set "
            f"{_COUNT_FLAG}: how it got them is not recorded, so the replay process does "
            "not recreate them"
        ]
    return []


def apply_cpu_threads(threads: int | None = None) -> list[int]:
    """Restricts this process to ``threads`` CPUs (default: ``$JAXREPRO_CPU_THREADS``).

    XLA:CPU sizes its thread pool from the process's CPU affinity when the backend
    starts, so call this first (or as a subprocess ``preexec_fn``). Returns the CPUs
    kept. Raises ValueError when fewer CPUs are available than asked for: the
    recorded setup cannot be recreated here, and the bits may differ.
    """
    if threads is None:
        if THREADS_ENV not in os.environ:
            raise ValueError(f"no thread count given and ${THREADS_ENV} is not set")
        threads = int(os.environ[THREADS_ENV])
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"thread count must be a positive int, got {threads!r}")
    available = sorted(os.sched_getaffinity(0))
    if len(available) < threads:
        raise ValueError(
            f"the run used {threads} CPU threads but only {len(available)} CPUs are available "
            "here: its process setup cannot be recreated (bits may differ)"
        )
    keep = available[:threads]
    os.sched_setaffinity(0, keep)
    return keep


def apply_env_threads() -> list[int] | None:
    """``apply_cpu_threads()`` if ``$JAXREPRO_CPU_THREADS`` is set, else nothing (None).

    For entry points: call it before the first JAX computation, so a process started
    with ``setup_for_replay``'s environment also gets the recorded thread count (no
    ``preexec_fn`` needed, which is unsafe to fork from a process running JAX threads).
    """
    if not os.environ.get(THREADS_ENV):
        return None
    return apply_cpu_threads()


def current_setup() -> dict[str, str]:
    """This process's setup in ``setup_for_replay``'s terms (reads the environment only)."""

    env = {
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
        THREADS_ENV: str(machine.cpu_threads()),
    }
    return env


def differences(run_json, current: dict[str, str] | None = None) -> list[str]:
    """What differs between a recorded setup and ``current`` (default: this process).

    An empty list means a replay in this process runs under the recorded setup; else
    each entry names a setting, e.g. ``"XLA_FLAGS: recorded '...', here '...'"``.
    """
    want = setup_for_replay(run_json)
    have = current_setup() if current is None else current
    out = []
    for key, value in want.items():
        mine = have.get(key, "")
        if key == "XLA_FLAGS":
            same = sorted(value.split()) == sorted(mine.split())
        else:
            same = value == mine
        if not same:
            out.append(f"{key}: recorded {value!r}, here {mine!r}")
    return out


def describe(env: dict[str, str]) -> str:
    """One line for the log: the setup a replay runs under."""
    return ", ".join(f"{k}={v!r}" for k, v in sorted(env.items()))


# ----------------------------------------------------------------------------- replays

REEXEC_ENV = "JAXREPRO_REPLAY_SETUP"  # set in a re-executed replay: what had differed (JSON)


def replay_process_setup(run_dir: str, argv, *, reexec: bool = True) -> dict | None:
    """Puts a replay of ``run_dir`` under the process setup its run.json records.

    ``jaxrepro replay`` calls this before JAX starts its backend. When this process's
    setup (XLA flags with the simulated device count, CPU threads) differs from the
    record and ``reexec`` is true, it re-executes the command line ``argv``
    (``sys.argv``, flags included) with the recorded setup and does not return. In the
    re-executed process it applies the recorded thread count. A JAX_PLATFORMS left unset
    here is not a difference: JAX picks the recorded backend itself on the same machine
    (the replay checks it).

    Returns what the replay summary records: ``recorded`` (the environment that
    ``setup_for_replay`` derives from run.json, nothing else), ``differed`` (what
    differed when the command was started), ``reexecuted``, ``differences`` (what still
    differs; empty when the setup is the recorded one) and ``not_recreated`` (what the
    record cannot say, :func:`not_recreated`), or None when ``run_dir`` has no run.json
    (the replay then reports the missing run).
    """
    import json
    import logging
    import sys

    log = logging.getLogger("jaxrepro")
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return None
    try:
        recorded = setup_for_replay(path)
        unrecorded = not_recreated(path)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise WorkdirError(f"{path}: cannot read the run's process setup: {e}") from e
    record = {
        "recorded": recorded,
        "differed": [],
        "reexecuted": False,
        "not_recreated": unrecorded,
    }
    for why in unrecorded:
        log.warning("replay: %s; its bits may differ", why)
    if REEXEC_ENV in os.environ:  # the re-executed replay
        record.update(differed=json.loads(os.environ[REEXEC_ENV]), reexecuted=True)
        try:
            apply_env_threads()
        except ValueError as e:
            raise WorkdirError(f"cannot recreate the setup recorded in {path}: {e}") from e
        record["differences"] = _relevant(path)
        return record
    differed = _relevant(path)
    record.update(differed=differed, differences=differed)
    if not differed or not reexec:
        return record
    env = dict(recorded)
    if THREADS_ENV in env and int(env[THREADS_ENV]) > len(os.sched_getaffinity(0)):
        log.warning(
            "the run used %s CPU threads; this machine has fewer: the replay cannot recreate "
            "that part of its setup, and its bits may differ", env[THREADS_ENV]
        )  # fmt: skip
        del env[THREADS_ENV]
        if all(d.startswith(THREADS_ENV) for d in differed):
            return record  # nothing a re-execution could change
    if not os.environ.get("JAX_PLATFORMS"):
        env.pop("JAX_PLATFORMS", None)
    child = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    child.update(env, **{REEXEC_ENV: json.dumps(differed)})
    log.warning(
        "replay: this process's setup differs from the run's (%s); re-executing with the "
        "settings run.json records: %s", "; ".join(differed), describe(env),
    )  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxrepro", *argv[1:]], child)
    raise AssertionError("unreachable")  # pragma: no cover


def _relevant(run_json) -> list[str]:
    """``differences`` without an unset JAX_PLATFORMS (JAX then picks the backend itself)."""
    here = current_setup()
    out = differences(run_json, here)
    if not here["JAX_PLATFORMS"]:
        out = [d for d in out if not d.startswith("JAX_PLATFORMS")]
    return out

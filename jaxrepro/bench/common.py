"""What every benchmark shares: options, the machine's description, timing summaries."""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from jaxrepro import machine
from jaxrepro.plumbing import procenv

DEFAULT_OUT = "results/bench"


# ----------------------------------------------------------------------------- options


def parse_options(words: list[str], defaults: dict) -> dict:
    """``key=value`` words -> a dict typed like ``defaults``.

    Raises:
      ValueError: for a word without '=', an unknown key or a value of the wrong type.
    """
    opts = dict(defaults)
    for word in words:
        if "=" not in word:
            raise ValueError(f"bench option {word!r} is not of the form key=value")
        key, value = word.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown bench option {key!r}; known: {', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        try:
            opts[key] = kind(value)
        except ValueError as e:
            raise ValueError(f"bench option {key}={value!r}: expected {kind.__name__}") from e
    return opts


def int_list(text: str, name: str) -> list[int]:
    """'32,224' -> [32, 224]; each must be a positive int."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"bench option {name}={text!r}: expected comma-separated ints") from e
    if not values or min(values) < 1:
        raise ValueError(f"bench option {name}={text!r}: expected positive ints")
    return values


def machine_info() -> dict:
    """Where the numbers come from; the load average says how shared the machine was."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": machine.cpu_threads(),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "glibc_tunables": procenv.malloc_setting(),  # jaxrepro/plumbing/procenv.py
    }


def versions() -> dict:
    import importlib.metadata

    out = {}
    for lib in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


# ----------------------------------------------------------------------------- timing


def summarize(times: list[float], batch: int) -> dict:
    """Median, spread and images/s of per-step wall times (seconds)."""
    q = np.percentile(times, [25, 75])
    med = statistics.median(times)
    return {
        "images_per_s": batch / med,
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_iqr": float(q[1] - q[0]),
        "steps_timed": len(times),
    }


def alternate(
    runners: dict, rounds: int, iters: int, cpu: dict | None = None, settle: int = 0
) -> dict:
    """Runs each runner ``iters`` times per round, in turn, for ``rounds`` rounds.

    Returns per-runner lists (one per round) of step wall times in seconds; ``cpu``, if
    given, receives the process CPU times the same way (robust to other processes'
    load, but it counts spinning threads too). Each runner must block until done.
    ``settle`` untimed steps open each runner's turn: the first step after another
    runner's turn pays to get back the memory that runner's allocator returned.
    """
    if rounds < 1 or iters < 1 or settle < 0:
        raise ValueError(
            f"rounds and iters must be >= 1 and settle >= 0, got {rounds}, {iters}, {settle}"
        )
    times = {name: [] for name in runners}
    cpu = {} if cpu is None else cpu
    for name in runners:
        cpu[name] = []
    for _ in range(rounds):
        for name, run in runners.items():
            walls, cpus = [], []
            for _ in range(settle):
                run()
            for _ in range(iters):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - start_cpu)
            times[name].append(walls)
            cpu[name].append(cpus)
    return times


def round_ratios(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """Per round: median time of ``b`` / median time of ``a`` (= a's speed over b's)."""
    return [statistics.median(tb) / statistics.median(ta) for ta, tb in zip(a, b, strict=True)]

"""``jaxrepro bench SUB``: the benchmarks, one module each, and their command line.

    step, portable  jaxrepro/bench/step.py     the train step against PyTorch; portable mode
    speed           jaxrepro/bench/speed.py    the real train step per dtype and GPU mode
    startup, e2e, checkpoint, memory, diagnose  jaxrepro/bench/runs.py  real runs
    data            jaxrepro/bench/data.py     the host input pipeline
    detector        jaxrepro/bench/detector.py the drop-off detector on labelled streams
    (invariant)     jaxrepro/bench/invariant.py  device-count-invariant mode's cost

Each writes one JSON file into ``--out`` (default results/bench); results/bench/NOTES.md
reads them. What they share is in ``common``.
"""

from __future__ import annotations

import os

from jaxrepro.bench.common import (
    DEFAULT_OUT,
    alternate,
    int_list,
    machine_info,
    parse_options,
    round_ratios,
    summarize,
    versions,
)
from jaxrepro.bench.step import (
    PORTABLE_DEFAULTS,
    STEP_DEFAULTS,
    _print_step,
    _variants,
    bench_portable,
    bench_step,
    torch_variants,
)

__all__ = [
    "DEFAULT_OUT", "PORTABLE_DEFAULTS", "STEP_DEFAULTS", "alternate", "bench_portable",
    "bench_step", "int_list", "machine_info", "main", "parse_options", "recorded",
    "round_ratios", "summarize", "versions",
]  # fmt: skip


# ----------------------------------------------------------------------------- CLI


def main(args: list[str], FLAGS) -> int:  # noqa: N803 - absl's name
    """Runs ``jaxrepro bench SUB [key=value ...]``; returns the exit status."""
    from jaxrepro.bench import speed as bench_speed
    from jaxrepro.errors import JaxreproError
    from jaxrepro.plumbing import jsonio

    if not args:
        raise JaxreproError(
            "bench needs a sub-command: step | speed | startup | e2e | checkpoint | memory | "
            "portable | diagnose | detector | data | all"
        )
    sub, words = args[0], args[1:]
    out = getattr(FLAGS, "out", None) or DEFAULT_OUT
    try:
        jobs = _jobs(sub, words)
    except ValueError as e:
        raise JaxreproError(str(e)) from e
    os.makedirs(out, exist_ok=True)
    for name, fn in jobs:
        try:
            result = fn()
        except ValueError as e:
            raise JaxreproError(str(e)) from e
        cores = result.get("options", {}).get("cores", 0)
        # a variant of a benchmark is its own file (e2e compare=tensorboard: e2e_tensorboard)
        stem = result["kind"] if str(result.get("kind", "")).startswith(f"{name}_") else name
        path = os.path.join(out, f"{stem}_cores{cores}.json" if cores else f"{stem}.json")
        if name == "detector":
            result = _detector_record(path, result, words)
        jsonio.write_json(path, recorded(result))
        if name == "step":
            _print_step(result)
        if name == "speed":
            bench_speed.print_speed(result)
        print(f"wrote {path}")
    return 0


def recorded(result: dict) -> dict:
    """The result as written: an absolute ``data_dir`` option (where this machine caches
    the data; no part of the measurement) kept as ``.../NAME``, so results carry no
    machine's path."""
    opts = result.get("options") or {}
    data_dir = opts.get("data_dir")
    if isinstance(data_dir, str) and os.path.isabs(data_dir):
        name = os.path.basename(os.path.normpath(data_dir))
        return dict(result, options=dict(opts, data_dir=f".../{name}"))
    return result


def _detector_record(path: str, result: dict, words: list[str]) -> dict:
    """detector.json: this measurement under ``current`` (or ``baseline``), the other kept
    from the file, so the figures of the detector before a change stay beside the new ones."""
    from jaxrepro.bench import detector as detector_bench
    from jaxrepro.plumbing import jsonio

    opts = parse_options(words, detector_bench.DEFAULTS)
    old = jsonio.read_json(path) if os.path.exists(path) else {}
    record = {"about": detector_bench.about(), "options": opts}
    for key in ("baseline", "current"):
        if key in old:
            record[key] = old[key]
    record[opts["record"]] = result
    return record


def _jobs(sub: str, words: list[str]):
    from jaxrepro.bench import data as bench_data
    from jaxrepro.bench import detector as detector_bench
    from jaxrepro.bench import runs as bench_runs
    from jaxrepro.bench import speed as bench_speed

    subs = {
        "step": lambda: bench_step(parse_options(words, STEP_DEFAULTS)),
        "speed": lambda: bench_speed.bench_speed(parse_options(words, bench_speed.DEFAULTS)),
        "startup": lambda: bench_runs.bench_startup(
            parse_options(words, bench_runs.STARTUP_DEFAULTS)
        ),
        "e2e": lambda: bench_runs.bench_e2e(parse_options(words, bench_runs.E2E_DEFAULTS)),
        "checkpoint": lambda: bench_runs.bench_checkpoint(
            parse_options(words, bench_runs.CHECKPOINT_DEFAULTS)
        ),
        "memory": lambda: bench_runs.bench_memory(parse_options(words, bench_runs.MEMORY_DEFAULTS)),
        "portable": lambda: bench_portable(parse_options(words, PORTABLE_DEFAULTS)),
        "diagnose": lambda: bench_runs.bench_diagnose(
            parse_options(words, bench_runs.DIAGNOSE_DEFAULTS)
        ),
        "detector": lambda: detector_bench.bench_detector(
            parse_options(words, detector_bench.DEFAULTS)
        ),
        "data": lambda: bench_data.bench_data(parse_options(words, bench_data.DATA_DEFAULTS)),
    }
    if sub == "all":
        if words:
            raise ValueError("bench all takes no options (run the sub-commands to set them)")
        # speed is the GPU check's (launch/gpu_check.sh): ResNet-50 at batch 128 per setting
        return [(name, job) for name, job in subs.items() if name != "speed"]
    if sub not in subs:
        raise ValueError(f"unknown bench sub-command {sub!r}; known: {', '.join(subs)}, all")
    # Parse now, so a typo fails before minutes of measuring.
    job = subs[sub]
    _validate_words(sub, words)
    return [(sub, job)]


def _validate_words(sub: str, words: list[str]) -> None:
    from jaxrepro.bench import data as bench_data
    from jaxrepro.bench import detector as detector_bench
    from jaxrepro.bench import runs as bench_runs
    from jaxrepro.bench import speed as bench_speed

    defaults = {
        "step": STEP_DEFAULTS,
        "speed": bench_speed.DEFAULTS,
        "startup": bench_runs.STARTUP_DEFAULTS,
        "e2e": bench_runs.E2E_DEFAULTS,
        "checkpoint": bench_runs.CHECKPOINT_DEFAULTS,
        "memory": bench_runs.MEMORY_DEFAULTS,
        "portable": PORTABLE_DEFAULTS,
        "diagnose": bench_runs.DIAGNOSE_DEFAULTS,
        "detector": detector_bench.DEFAULTS,
        "data": bench_data.DATA_DEFAULTS,
    }[sub]
    opts = parse_options(words, defaults)
    if sub == "step":
        _variants(opts)
        torch_variants(opts)
    if sub == "speed":
        bench_speed.settings(opts)
    if sub == "e2e" and opts["compare"] not in bench_runs.E2E_COMPARE:
        raise ValueError(
            f"bench option compare={opts['compare']!r}; valid: '' or "
            + ", ".join(c for c in bench_runs.E2E_COMPARE if c)
        )

"""Run-level benchmarks behind ``jaxrepro bench startup | e2e | memory`` (see bench/__init__.py).

* ``startup``: process start -> first train step done, in fresh processes: with an empty
  persistent compilation cache (cold), then again with the same cache (warm: a second
  run of the same config, as in a seed study). A breakdown (imports, data, init, eval,
  checkpoint, step compile, first step) and jax's compile / cache-hit counts come back
  from the child. ``init=module|fast|both`` picks the initialiser the child uses:
  ``jax.jit(module.init)`` (what the loop used before) or ``models.init_variables`` (its own).
* ``e2e``: steady-state train steps/s of real runs (``loop.run``: host data pipeline,
  metrics rows, drop-off detector, checkpoints at the config's cadence) against the
  same compiled step called back to back on a device-resident batch; the same run with
  ``checkpoint.every=0``; and ``replay.replay`` of k steps against the original k steps.
  Rounds alternate the variants.
* ``checkpoint``: the cost of one save of the config's train state (params, batch
  statistics, Adam moments) as the loop writes it (packed: one array per dtype, as raw
  files around the page cache), the same packed arrays written by orbax (the layout
  before raw files) and one orbax array per leaf (before packing), alternated: the
  time the caller is held, the time to the save's end, the process CPU time over that
  span (the writing threads included: on a 2-core machine, time taken from training),
  and a restore, checked bit for bit.
* ``memory``: peak resident memory (``ru_maxrss`` of the child, from ``wait4``) of whole
  ``jaxrepro train`` runs.

Everything here runs whole programs, so it is slow: tests use the smoke config.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STARTUP_DEFAULTS = {
    "config": "configs/digits.py",
    "set": "",  # extra config overrides, 'a.b=1;c.d=x'
    "init": "both",  # module | fast | both
    "runs": 2,  # cold, then warm runs with the same cache
    "data_dir": "",
    # <0: the CLI's own jax_persistent_cache_min_compile_time_secs; >=0: this value instead
    "cache_min_compile_s": -1.0,
}
E2E_DEFAULTS = {
    "config": "configs/digits.py",
    "set": "",
    "steps": 80,  # pretrain steps of each run (no fine-tune phase)
    "warmup": 3,  # leading steps left out of the steady-state window
    "rounds": 5,  # a round's efficiency scatters by +-6 % on a shared 2-core machine
    "replay_from": 0,  # 0: the last checkpoint before the end
    "data_dir": "",
    # '': the variants above; 'tensorboard': runs with event files on and off, side by
    # side (e2e_tensorboard.json)
    "compare": "",
}
E2E_COMPARE = ("", "tensorboard")
CHECKPOINT_DEFAULTS = {"config": "configs/digits.py", "set": "", "rounds": 4, "data_dir": ""}
MEMORY_DEFAULTS = {"configs": "configs/digits.py:smoke,configs/digits.py", "data_dir": ""}
INIT_CHOICES = ("module", "fast", "both")


def _config_summary(config) -> dict:
    """What a timed run's config is, in a bench result."""
    return {
        "model": config.model.name,
        "image_size": config.data.image_size,
        "batch_size": config.pretrain.batch_size,
        "checkpoint_every": config.checkpoint.every,
        "eval_every": config.pretrain.eval_every,
    }


def load_config(path_arg: str, overrides: str, data_dir: str):
    """configs/x.py[:variant] with 'a.b=v;...' overrides and an optional data dir."""
    from jaxrepro import config as config_lib

    config = config_lib.load_config_file(path_arg)
    for item in filter(None, (s.strip() for s in overrides.split(";"))):
        if "=" not in item:
            raise ValueError(f"bench option set: {item!r} is not key=value")
        key, value = item.split("=", 1)
        config_lib.apply_override(config, key.strip(), value.strip())
    if data_dir:
        config.data.data_dir = data_dir
    config.runtime.progress_every_s = 1e9  # no progress lines in measurements
    config.runtime.progress = "off"  # nor a bar
    return config


# ----------------------------------------------------------------------------- startup


def bench_startup(opts: dict) -> dict:
    """Cold and warm time-to-first-step of the config, per initialiser."""
    if opts["init"] not in INIT_CHOICES:
        raise ValueError(f"bench option init={opts['init']!r}; valid: {', '.join(INIT_CHOICES)}")
    if opts["runs"] < 1:
        raise ValueError(f"bench option runs must be >= 1, got {opts['runs']}")
    from jaxrepro.bench.common import machine_info

    inits = ("module", "fast") if opts["init"] == "both" else (opts["init"],)
    # the children inherit this process's environment, glibc's tunables included
    out = {"kind": "startup", "options": opts, "machine": machine_info(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-startup-") as tmp:
        for init in inits:
            cache = os.path.join(tmp, f"cache-{init}")
            runs = []
            for i in range(opts["runs"]):
                workdir = os.path.join(tmp, f"run-{init}-{i}")
                runs.append(_startup_child(opts, init, cache, workdir))
                runs[-1]["cache"] = "cold" if i == 0 else "warm"
            out["results"][init] = runs
    return out


def _startup_child(opts: dict, init: str, cache: str, workdir: str) -> dict:
    args = json.dumps({**opts, "init": init, "cache": cache, "workdir": workdir})
    code = f"from jaxrepro.bench import runs; runs.startup_child({args!r})"
    env = dict(os.environ, JAXREPRO_COMPILE_CACHE_DIR=cache, JAXREPRO_COMPILE_CACHE="1")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"startup child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    marks = result.pop("marks")
    result["time_to_first_step_s"] = marks["first_step_done"] - start
    result["python_start_s"] = marks["python"] - start
    result["process_exit_s"] = time.time() - start
    return result


class _Timer:
    """Accumulates wall time of wrapped callables by name (the bench child's probes)."""

    def __init__(self):
        self.seconds, self.calls = {}, {}

    def wrap(self, owner, attr: str, name: str | None = None):
        fn = getattr(owner, attr)
        name = name or attr

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attr, timed)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1


def _SpanTimer(timer: _Timer):  # noqa: N802 - a class made on demand (loop imports jax)
    """The loop's timing hooks feeding a ``_Timer``: eval, checkpoint, step compile."""
    from jaxrepro.train import loop

    names = {"eval": "eval", "checkpoint": "checkpoint", "compile": "step_trace_compile"}

    class SpanTimer(loop.Hooks):
        @contextlib.contextmanager
        def span(self, name, step):
            start = time.perf_counter()
            try:
                yield
            finally:
                timer.add(names[name], time.perf_counter() - start)

    return SpanTimer()


def _compile_listener(stats: dict):
    import jax

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            stats["backend_compiles"] += 1
            stats["backend_compile_s"] += duration
        elif event == "/jax/compilation_cache/compile_time_saved_sec":
            stats["compile_time_saved_s"] += duration

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            stats["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)


def module_init(module, key, image_size: int):
    """The plain way to initialise: ``jax.jit(module.init)`` at batch 1 (same values)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: module.init({"params": k}, x, train=False))(key)
    return variables["params"], variables.get("batch_stats", {})


def startup_child(args_json: str) -> None:
    """In a fresh process: one run of the config, stopped after its first train step."""
    marks = {"python": time.time()}
    a = json.loads(args_json)
    import jax

    from jaxrepro import models
    from jaxrepro.plumbing import compile_cache
    from jaxrepro.train import loop
    from jaxrepro.train import setup as setup_lib
    from jaxrepro.train import state as state_lib

    marks["imports"] = time.time()
    compile_cache.setup()
    if a["cache_min_compile_s"] >= 0:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", a["cache_min_compile_s"])
    stats = dict.fromkeys(("backend_compiles", "cache_hits"), 0)
    stats.update(backend_compile_s=0.0, compile_time_saved_s=0.0)
    _compile_listener(stats)
    timer = _Timer()
    if a["init"] == "module":  # what train/state.py did before models.init_variables
        state_lib.init_variables = module_init
    else:
        state_lib.init_variables = models.init_variables
    timer.wrap(state_lib, "init_variables", "init")
    timer.wrap(setup_lib, "load_data", "data")
    config = load_config(a["config"], a["set"], a["data_dir"])
    info = loop.run(config, a["workdir"], stop_after=1, hooks=_SpanTimer(timer))
    marks["first_step_done"] = time.time()
    result = {
        "init": a["init"], "marks": marks, "seconds": timer.seconds, "calls": timer.calls,
        "programs": info.get("programs"),  # the train step: loaded from the program cache?
        "cache_min_compile_s": jax.config.jax_persistent_cache_min_compile_time_secs,
        "imports_s": marks["imports"] - marks["python"], "compiles": stats,
        "backend": jax.default_backend(),
    }  # fmt: skip
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- e2e


class _StepClock:
    """Records when each train step is dispatched and when each eval runs (loop hooks)."""

    def __init__(self):
        self.entries: list[float] = []
        self.cpu: list[float] = []  # process CPU time at each dispatch
        self.evals: list[tuple[float, float]] = []
        self.eval_cpu: list[tuple[float, float]] = []
        self.eval_steps: list[int] = []

    def hooks(self):
        from jaxrepro.train import loop

        clock = self

        class Clock(loop.Hooks):
            def dispatch(self, step):
                clock.entries.append(time.perf_counter())
                clock.cpu.append(time.process_time())

            @contextlib.contextmanager
            def span(self, name, step):
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    yield
                finally:
                    if name == "eval":
                        clock.evals.append((start, time.perf_counter()))
                        clock.eval_cpu.append((start_cpu, time.process_time()))
                        clock.eval_steps.append(step)

        return Clock()

    def synced_rate(self, first_step: int) -> dict | None:
        """Steps/s between evals: from the end of the first eval at or after step
        ``first_step`` to the start of the last eval, the evals between left out.

        Before an eval the loop has read every earlier step's metrics, so all of them
        have finished: these are points where the host and the computation meet. Dispatch
        times are not (the loop dispatches up to ``2 * record.FETCH_BLOCK`` steps ahead).
        None when the run has fewer than two evals from ``first_step`` on.
        """
        steps = sorted({st for st in self.eval_steps if st >= first_step})
        if len(steps) < 2:
            return None
        marks = list(zip(self.eval_steps, self.evals, self.eval_cpu, strict=True))
        t0, c0 = max((e, ce) for st, (_, e), (_, ce) in marks if st == steps[0])
        t1, c1 = min((s, cs) for st, (s, _), (cs, _) in marks if st == steps[-1])
        inner = [(w, c) for st, w, c in marks if steps[0] < st < steps[-1]]
        evals = sum(e - s for (s, e), _ in inner)
        eval_cpu = sum(e - s for _, (s, e) in inner)
        n = steps[-1] - steps[0]
        return {
            "window": f"evals at steps {steps[0]}..{steps[-1]}", "steps": n,
            "window_s": t1 - t0, "eval_s": evals, "steps_per_s": n / (t1 - t0),
            "steps_per_s_excl_eval": n / (t1 - t0 - evals),
            "cpu_s_per_step_excl_eval": (c1 - c0 - eval_cpu) / n,
        }  # fmt: skip

    def rate(self, first: int, last: int) -> dict:
        """Steps/s between dispatches ``first`` and ``last``, with and without evals."""
        if last <= first or last >= len(self.entries):
            raise ValueError(f"need dispatches {first}..{last}, have {len(self.entries)}")
        t0, t1 = self.entries[first], self.entries[last]
        evals = sum(min(e, t1) - max(s, t0) for s, e in self.evals if e > t0 and s < t1)
        c0, c1 = self.cpu[first], self.cpu[last]
        eval_cpu = sum(min(e, c1) - max(s, c0) for s, e in self.eval_cpu if e > c0 and s < c1)
        steps = last - first
        return {
            "steps": steps, "window_s": t1 - t0, "eval_s": evals,
            "steps_per_s": steps / (t1 - t0), "steps_per_s_excl_eval": steps / (t1 - t0 - evals),
            "cpu_s_per_step_excl_eval": (c1 - c0 - eval_cpu) / steps,
        }  # fmt: skip


def _run_timed(config, workdir: str, warmup: int) -> dict:
    from jaxrepro.train import loop

    clock = _StepClock()
    start = time.perf_counter()
    info = loop.run(config, workdir, hooks=clock.hooks())
    total = time.perf_counter() - start
    out = clock.synced_rate(warmup) or dict(
        clock.rate(warmup, len(clock.entries) - 1), window="dispatches"
    )
    out["eval_marks"] = [  # (step, start, end): the replay comparison's sync points
        (st, s, e) for st, (s, e) in zip(clock.eval_steps, clock.evals, strict=True)
    ]
    out.update(total_s=total, status=info["status"], checkpoints=_checkpoint_steps(workdir))
    out["entries"] = clock.entries  # for the replay comparison; dropped from the JSON
    return out


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def bare_step_rate(config, workdir: str, steps: int, warmup: int) -> dict:
    """The run's own compiled train step, back to back on one device-resident batch."""
    import jax

    from jaxrepro.train.programs import Programs
    from jaxrepro.train.setup import RunSetup

    setup = RunSetup(config)
    phase = setup.phases[0]
    state = setup.par.replicate(setup.init_state())  # the loop's own placement
    batch, _ = setup.device_batch(phase, 0)
    keys = setup.step_inputs(phase)
    fn = Programs(setup).train_fn(phase, state, batch)
    for _ in range(warmup):
        state, metrics = fn(state, batch, *keys)
    jax.block_until_ready(metrics)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = fn(state, batch, *keys)
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - start
    cpu = (time.process_time() - start_cpu) / steps
    return {"steps": steps, "window_s": wall, "steps_per_s": steps / wall, "cpu_s_per_step": cpu}


def bench_e2e(opts: dict) -> dict:
    """Real runs vs the bare step, checkpoint overhead and replay cost, alternated; with
    ``compare=tensorboard``, runs with event files on and off instead."""
    from jaxrepro import replay

    if opts["warmup"] < 1 or opts["steps"] < opts["warmup"] + 2:
        raise ValueError(
            f"bench options need warmup >= 1 and steps > warmup + 1, got warmup="
            f"{opts['warmup']}, steps={opts['steps']}"
        )
    if opts["compare"] not in E2E_COMPARE:
        raise ValueError(f"bench option compare={opts['compare']!r}; valid: '' or tensorboard")
    if opts["rounds"] < 1:
        raise ValueError(f"bench option rounds must be >= 1, got {opts['rounds']}")
    if opts["compare"] == "tensorboard":
        return bench_e2e_tensorboard(opts)
    config = _e2e_config(opts)
    no_ckpt = _e2e_config(opts, checkpoint_every=0)
    rounds = {"bare": [], "run": [], "run_no_checkpoints": [], "replay": []}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-e2e-") as tmp:
        for r in range(opts["rounds"]):
            bare_dir = os.path.join(tmp, f"bare{r}")
            rounds["bare"].append(bare_step_rate(config, bare_dir, opts["steps"], opts["warmup"]))
            run_dir = os.path.join(tmp, f"run{r}")
            rounds["run"].append(_run_timed(config, run_dir, opts["warmup"]))
            rounds["run_no_checkpoints"].append(
                _run_timed(no_ckpt, os.path.join(tmp, f"noc{r}"), opts["warmup"])
            )
            rounds["replay"].append(_replay_timed(replay, run_dir, rounds["run"][-1], opts))
            shutil.rmtree(run_dir, ignore_errors=True)
    return _e2e_summary(opts, config, rounds)


def bench_e2e_tensorboard(opts: dict) -> dict:
    """The same run with ``runtime.tensorboard`` on and off, side by side.

    Each round measures the bare step, then both runs, in the order on, off in even rounds
    and off, on in odd ones, so a drift of the machine's load weighs on both alike. The
    ratio is time per step with event files over time per step without (> 1: what they
    cost), per round and as the median, from the steps between evals (the event files'
    flushes after each eval and before each checkpoint included) and from CPU time.
    """
    from jaxrepro import tbevents
    from jaxrepro.bench.common import machine_info

    configs = {}
    for name, on in (("on", True), ("off", False)):
        configs[name] = _e2e_config(opts)
        configs[name].runtime.tensorboard = on
    rounds = {"bare": [], "on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-e2e-tb-") as tmp:
        for r in range(opts["rounds"]):
            bare_dir = os.path.join(tmp, f"bare{r}")
            rounds["bare"].append(
                bare_step_rate(configs["on"], bare_dir, opts["steps"], opts["warmup"])
            )
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                run_dir = os.path.join(tmp, f"{name}{r}")
                with _event_writer_time() as writer_s:
                    row = _run_timed(configs[name], run_dir, opts["warmup"])
                row["event_writer_s"] = writer_s  # the time inside the writer's methods
                row.pop("entries", None)
                row.pop("eval_marks", None)
                row["event_files"] = len(tbevents.event_files(run_dir))
                row["order"] = 0 if (name == "on") == (r % 2 == 0) else 1
                rounds[name].append(row)
                shutil.rmtree(run_dir, ignore_errors=True)
    on, off, bare = rounds["on"], rounds["off"], rounds["bare"]
    # The writer's own time against the run's: a direct measure that the machine's load
    # does not blur as it does the ratio of two runs' rates.
    writer_share = [x["event_writer_s"]["wall_s"] / x["total_s"] for x in on if x["total_s"] > 0]
    pairs = list(zip(on, off, strict=True))
    wall = [o["steps_per_s_excl_eval"] / n["steps_per_s_excl_eval"] for n, o in pairs]
    cpu = [n["cpu_s_per_step_excl_eval"] / o["cpu_s_per_step_excl_eval"] for n, o in pairs]
    config = configs["on"]
    return {
        "kind": "e2e_tensorboard", "options": opts, "machine": machine_info(),
        "config": _config_summary(config),
        # time per step with event files / without: > 1 is what they cost
        "on_over_off": statistics.median(wall),
        "on_over_off_per_round": wall,
        "on_over_off_spread": [min(wall), max(wall)],
        "on_over_off_cpu": statistics.median(cpu),
        "on_over_off_cpu_per_round": cpu,
        "steps_per_s_excl_eval": {k: _median(v, "steps_per_s_excl_eval") for k, v in
                                  (("on", on), ("off", off))},
        "bare_steps_per_s": _median(bare, "steps_per_s"),
        # run / bare step, per round (the efficiency of bench e2e) for each
        "efficiency_excl_eval": {
            k: statistics.median(x["steps_per_s_excl_eval"] / b["steps_per_s"]
                                 for x, b in zip(rows, bare, strict=True))
            for k, rows in (("on", on), ("off", off))
        },
        "event_writer_share_of_run": statistics.median(writer_share),
        "event_writer_s_per_run": statistics.median(x["event_writer_s"]["wall_s"] for x in on),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds,
    }  # fmt: skip


@contextlib.contextmanager
def _event_writer_time():
    """Wall and CPU seconds spent inside ``tbevents.EventWriter``'s methods (opening,
    adding rows, encoding and writing at flushes, closing) while the block runs."""
    from jaxrepro import tbevents

    cls = tbevents.EventWriter
    spent = {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0}
    names = ("__init__", "add_row", "add_dropoff", "flush", "close")
    real = {n: cls.__dict__[n] for n in names}

    depth = [0]  # __init__ and close call flush: only the outermost call counts

    def timed(fn):
        def wrapper(*a, **kw):
            depth[0] += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent["wall_s"] += time.perf_counter() - t0
                    spent["cpu_s"] += time.thread_time() - c0
                    spent["calls"] += 1

        return wrapper

    for n, fn in real.items():
        setattr(cls, n, timed(fn))
    try:
        yield spent
    finally:
        for n, fn in real.items():
            setattr(cls, n, fn)


def _e2e_config(opts: dict, checkpoint_every: int | None = None):
    """The config as a single pretrain phase of ``steps`` steps."""
    config = load_config(opts["config"], opts["set"], opts["data_dir"])
    config.pretrain.epochs = None
    config.pretrain.steps = opts["steps"]
    config.finetune.epochs = None
    config.finetune.steps = 0
    if checkpoint_every is not None:
        config.checkpoint.every = checkpoint_every
    return config


def _replay_timed(replay_mod, run_dir: str, original: dict, opts: dict) -> dict:
    """replay.replay of the steps after a checkpoint vs the original's time for them."""
    ckpts = [s for s in original["checkpoints"] if s < opts["steps"]]
    start_step = opts["replay_from"] or max(ckpts)
    k = opts["steps"] - start_step
    t0 = time.perf_counter()
    summary = replay_mod.replay(run_dir, from_step=start_step, steps=k)
    total = time.perf_counter() - t0
    # The original's time for the same k steps: from the end of its eval at start_step to
    # the start of its final eval (every step done at both); without an eval at
    # start_step, from dispatch stamps (which lead the computation by the fetch lag).
    marks = original["eval_marks"]
    ends = [e for st, _, e in marks if st == start_step]
    if ends and marks[-1][0] == opts["steps"]:
        orig = marks[-1][1] - max(ends)
    else:
        entries = original["entries"]
        orig = entries[-1] - entries[start_step] + (entries[-1] - entries[-2])
    return {
        "from_step": start_step, "steps": k, "replay_total_s": total,
        "original_steps_s": orig, "bitwise_equal": summary["bitwise_equal"],
        "replay_over_original": total / orig,
    }  # fmt: skip


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _median_ratio(num: list[dict], den: list[dict], key: str) -> float | None:
    """Median over rounds of num[key] / den[key]; None when a round measured zero (a
    small state's save can take less CPU time than the clock resolves)."""
    pairs = list(zip(num, den, strict=True))
    if any(d[key] <= 0 for _, d in pairs):
        return None
    return statistics.median(n[key] / d[key] for n, d in pairs)


def _e2e_summary(opts, config, rounds) -> dict:
    from jaxrepro.bench.common import machine_info

    for rows in rounds.values():
        for row in rows:
            row.pop("entries", None)
            row.pop("eval_marks", None)
    bare = _median(rounds["bare"], "steps_per_s")
    run = _median(rounds["run"], "steps_per_s")
    run_x = _median(rounds["run"], "steps_per_s_excl_eval")
    noc = _median(rounds["run_no_checkpoints"], "steps_per_s")
    per_round = [
        r["steps_per_s_excl_eval"] / b["steps_per_s"]
        for r, b in zip(rounds["run"], rounds["bare"], strict=True)
    ]
    # CPU time per step: the work the loop adds (host code, checkpoint threads), whatever
    # the machine's other load does to wall times.
    cpu_bare = _median(rounds["bare"], "cpu_s_per_step")
    cpu_run = _median(rounds["run"], "cpu_s_per_step_excl_eval")
    cpu_noc = _median(rounds["run_no_checkpoints"], "cpu_s_per_step_excl_eval")
    return {
        "kind": "e2e", "options": opts, "machine": machine_info(),
        "config": _config_summary(config),
        "bare_steps_per_s": bare, "run_steps_per_s": run, "run_steps_per_s_excl_eval": run_x,
        "run_no_checkpoints_steps_per_s": noc,
        "efficiency_excl_eval": run_x / bare, "efficiency_incl_eval": run / bare,
        "efficiency_per_round": per_round,
        # Time per step with the default checkpoint cadence over time per step without
        # checkpoints (> 1: what checkpointing costs), from the medians and per round.
        "checkpoint_overhead_ratio": noc / run,
        "checkpoint_overhead_per_round": [
            n["steps_per_s"] / r["steps_per_s"]
            for r, n in zip(rounds["run"], rounds["run_no_checkpoints"], strict=True)
        ],
        "cpu_s_per_step": {"bare": cpu_bare, "run_excl_eval": cpu_run,
                           "run_no_checkpoints_excl_eval": cpu_noc},
        "efficiency_cpu": cpu_bare / cpu_run,
        "checkpoint_overhead_ratio_cpu": cpu_run / cpu_noc,
        "replay_over_original": _median(rounds["replay"], "replay_over_original"),
        "rounds": rounds,
    }  # fmt: skip


# ----------------------------------------------------------------------------- checkpoint

CHECKPOINT_LAYOUTS = ("raw", "orbax-packed", "leaves")


def bench_checkpoint(opts: dict) -> dict:
    """Save and restore cost of the config's initial train state, per layout, alternated."""
    import jax
    import numpy as np

    from jaxrepro.bench.common import machine_info
    from jaxrepro.checkpoints import Checkpoints
    from jaxrepro.plumbing import hashing
    from jaxrepro.train.setup import RunSetup

    if opts["rounds"] < 1:
        raise ValueError(f"bench option rounds must be >= 1, got {opts['rounds']}")
    config = load_config(opts["config"], opts["set"], opts["data_dir"])
    rounds = {layout: [] for layout in CHECKPOINT_LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-ckpt-") as tmp:
        state = RunSetup(config).init_state()
        state = jax.block_until_ready(state)
        want = hashing.leaf_hashes(state)
        for r in range(opts["rounds"]):
            for layout in CHECKPOINT_LAYOUTS:
                ckpts = Checkpoints(os.path.join(tmp, f"{layout}{r}"))
                t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                ckpts.save(1, state, {}, layout=layout)
                t1 = time.perf_counter()
                ckpts.wait()
                t2, c2 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                got, _ = ckpts.restore(1, state)
                got = jax.block_until_ready(got)
                t3 = time.perf_counter()
                if hashing.leaf_hashes(got) != want:
                    raise RuntimeError(f"{layout} checkpoint did not restore bit for bit")
                ckpts.close()
                rounds[layout].append({
                    "save_held_s": t1 - t0, "save_total_s": t2 - t0,
                    "save_cpu_s": (c2.ru_utime - c0.ru_utime) + (c2.ru_stime - c0.ru_stime),
                    "save_user_s": c2.ru_utime - c0.ru_utime,
                    "save_system_s": c2.ru_stime - c0.ru_stime,
                    "restore_s": t3 - t2,
                })  # fmt: skip
                shutil.rmtree(ckpts.directory, ignore_errors=True)
    leaves = jax.tree.leaves(state)
    keys = ("save_held_s", "save_total_s", "save_cpu_s", "restore_s")
    out = {
        "kind": "checkpoint", "options": opts, "machine": machine_info(),
        "state": {"model": config.model.name, "arrays": len(leaves),
                  "mib": sum(np.asarray(x).nbytes for x in leaves) / 2**20},
        "median": {lay: {k: _median(rows, k) for k in keys} for lay, rows in rounds.items()},
        # per round, another layout / the raw files the loop writes (> 1: what they save)
        **{
            f"{other.replace('-', '_')}_over_raw": {
                k: _median_ratio(rounds[other], rounds["raw"], k)
                for k in keys
            }
            for other in CHECKPOINT_LAYOUTS[1:]
        },
        "rounds": rounds,
    }  # fmt: skip
    return out


# ----------------------------------------------------------------------------- memory


def bench_memory(opts: dict) -> dict:
    """Peak RSS of whole ``jaxrepro train`` runs, one fresh process each."""
    configs = [c for c in opts["configs"].split(",") if c]
    if not configs:
        raise ValueError("bench option configs is empty")
    from jaxrepro.bench.common import machine_info

    out = {"kind": "memory", "options": opts, "machine": machine_info(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-mem-") as tmp:
        for i, cfg in enumerate(configs):
            out["runs"].append(peak_rss_of_run(cfg, os.path.join(tmp, f"w{i}"), opts["data_dir"]))
    return out


def peak_rss_of_run(config_arg: str, workdir: str, data_dir: str = "") -> dict:
    """Runs ``python -m jaxrepro train`` and returns its status, wall time and peak RSS."""
    cmd = [sys.executable, "-m", "jaxrepro", "train", f"--config={config_arg}",
           f"--workdir={workdir}", "--config.runtime.progress_every_s=1e9"]  # fmt: skip
    if data_dir:
        cmd.append(f"--config.data.data_dir={data_dir}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "config": config_arg, "exit_code": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "stderr_tail": stderr[-500:] if proc.returncode else "",
    }  # fmt: skip


# ----------------------------------------------------------------------------- diagnose

DIAGNOSE_DEFAULTS = {
    "config": "configs/digits.py",
    "set": "",
    "data_dir": "",
    "steps": 80,  # the run: pretraining only, evals and checkpoints every 20 steps
    "onset": 60,  # the diagnosed event's step (planted: the bench times, it does not judge)
    "arms": "exact,aug:4,order:2,skip,lr:0.5,clip:1.0",
}


def bench_diagnose(opts: dict) -> dict:
    """A diagnosis's cost against the run's own: one arm's step over one training step,
    and the fixed cost (restore, compile, the restored state's eval) warm and cold. Warm:
    the caches the run filled (JAX's and the program cache: the run's train step is loaded
    without a trace); cold: both empty.

    The run is the config cut to ``steps`` pretraining steps (evals and checkpoints every
    20), timed between evals as ``bench e2e`` does; its dropoffs.json is replaced by one
    event at ``onset`` so the arms run from the checkpoint before it to the phase's end.
    Then ``jaxrepro diagnose`` runs twice as a process of its own: with the compile cache
    the run filled (warm) and with an empty one (cold).
    """
    import shutil
    import subprocess
    import sys

    from jaxrepro import dropoff as dropoff_lib
    from jaxrepro.bench.common import machine_info
    from jaxrepro.diagnose import arms as arms_lib
    from jaxrepro.diagnose import engine
    from jaxrepro.plumbing import jsonio

    if not 0 < opts["onset"] < opts["steps"]:
        raise ValueError(f"bench option onset must be in (0, steps), got {opts['onset']}")
    arms_lib.parse_arms(opts["arms"])
    config = load_config(opts["config"], opts["set"], opts["data_dir"])
    with config.unlocked():
        config.pretrain.epochs, config.pretrain.steps = None, opts["steps"]
        config.finetune.epochs, config.finetune.steps = None, 0
        config.pretrain.eval_every = config.checkpoint.every = 20
        config.checkpoint.keep_last = 100
    out = {"kind": "diagnose", "options": opts, "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="jaxrepro-diag-") as tmp:
        run = os.path.join(tmp, "run")
        timed = _run_timed(config, run, warmup=20)
        timed.pop("entries", None)
        step_s = timed["window_s"] / timed["steps"]  # evals in the window included
        event = {"step": opts["onset"], "phase": "pretrain", "metric": "loss", "kind": "spike",
                 "before": 1.0, "after": 4.0, "size": 3.0, "end_step": opts["onset"],
                 "peak_step": opts["onset"], "peak_after": 4.0, "peak_size": 3.0,
                 "confirmed_step": opts["onset"], "severity": 1.0}  # fmt: skip
        dropoff_lib.write_dropoffs(run, [event])
        runs = {}
        for name in ("warm", "cold"):
            shutil.rmtree(os.path.join(run, engine.DIR), ignore_errors=True)
            env = dict(os.environ)
            if name == "cold":
                env["JAXREPRO_COMPILE_CACHE_DIR"] = os.path.join(tmp, "empty-cache")
            argv = [sys.executable, "-m", "jaxrepro", "diagnose", f"--workdir={run}",
                    "--dropoff=0", f"--arms={opts['arms']}"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"diagnose failed: {proc.stderr[-2000:]}")
            (d,) = [
                jsonio.read_json(os.path.join(run, engine.DIR, e, "diagnosis.json"))
                for e in os.listdir(os.path.join(run, engine.DIR))
                if os.path.isfile(os.path.join(run, engine.DIR, e, "diagnosis.json"))
            ]
            arm_s = sum(d["timing"]["arms"].values())
            n_arms = len(d["timing"]["arms"])
            runs[name] = {
                "process_wall_s": round(wall, 2),
                "fixed_s": d["timing"]["fixed_s"],
                "setup_s": d["timing"].get("setup_s"),
                "arms": n_arms,
                "steps_per_arm": d["steps_per_arm"],
                "arm_step_s": arm_s / (n_arms * d["steps_per_arm"]),
                "exact_bitwise": d["exact_bitwise"],
                "programs": d.get("programs"),  # the train step: loaded or compiled
            }
    out.update(
        run=timed,
        train_step_s=step_s,
        diagnosis=runs,
        arm_step_over_train_step=round(runs["warm"]["arm_step_s"] / step_s, 3),
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
    )
    return out

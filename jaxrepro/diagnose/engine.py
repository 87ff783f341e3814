"""Running a diagnosis: one restore per event, every arm in this process.

``diagnose(RUN, dropoff=0)`` restores the last checkpoint strictly before the drop-off's
onset once, then runs each arm (jaxrepro/diagnose/arms.py) from there through the onset
plus ``after`` steps, stopping at the phase's end. Every arm runs the run's own compiled
train step of that phase (compiled once, shared by all arms: the augmentation root, the
batch, the learning-rate multiplier and the clip threshold are its inputs), so the
``exact`` arm is the very program the run ran, and is checked row by row against it.

Each arm's rows go through the run's own drop-off detector, with the original rows before
the restore step as its history; the event recurs in an arm when an episode of the same
phase, metric and kind has its onset within ``diagnose.window`` steps of the original's
(jaxrepro/diagnose/verdict.py).

Everything is written under ``RUN/diagnoses/``: per event ``EVENT/diagnosis.json``,
``EVENT/arms/ARM.jsonl`` (an arm's rows, written whole when it finishes), the figure and
``EVENT/summary.md``; ``RUN/diagnoses/summary.md`` over all events. A diagnosis that was
interrupted resumes: the arms whose rows are on disk are not run again. A lock file keeps
two diagnoses of one run apart.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import time

import jax
import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import dropoff as dropoff_lib
from jaxrepro import machine, rng, trajectory
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.data import order as order_lib
from jaxrepro.diagnose import arms as arms_lib
from jaxrepro.diagnose import figure as figure_lib
from jaxrepro.diagnose import verdict as verdict_lib
from jaxrepro.errors import CheckpointError, ConfigError, WorkdirError
from jaxrepro.plumbing import jsonio
from jaxrepro.train import runinfo
from jaxrepro.train.evaluation import Evaluator
from jaxrepro.train.programs import Programs
from jaxrepro.train.progress import Progress
from jaxrepro.train.record import FETCH_BLOCK, is_logged, train_row
from jaxrepro.train.setup import RunSetup
from jaxrepro.train.step import step_controls, unpack_metrics
from jaxrepro.workdir import Workdir

log = logging.getLogger("jaxrepro")
DIR = "diagnoses"


# ----------------------------------------------------------------------------- planning


def select_events(events: list[dict], dropoff) -> list[int]:
    """``'all'`` or an index -> the indices to diagnose; a clear error out of range."""
    if not events:
        raise WorkdirError("the run has no recorded drop-offs (dropoffs.json is empty)")
    if dropoff in (None, "all"):
        return list(range(len(events)))
    try:
        index = int(dropoff)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--dropoff={dropoff!r}: an index or 'all'") from e
    if not 0 <= index < len(events):
        raise WorkdirError(
            f"drop-off {index} does not exist: the run has {len(events)} "
            f"(valid: 0..{len(events) - 1})"
        )
    return [index]


def restore_step(event: dict, available: list[int], config) -> int:
    """The last checkpoint strictly before the event's onset, in the event's phase."""
    before = [s for s in available if s < int(event["step"])]
    if not before:
        nearest = min(available, key=lambda s: abs(s - int(event["step"])), default=None)
        c = config.checkpoint
        raise CheckpointError(
            f"no checkpoint before the drop-off at step {event['step']}: the nearest is "
            f"{nearest} (checkpoints: {available}); checkpoint.every={c.every} with "
            f"keep_last={c.keep_last} would keep one before a later onset only if saved "
            "often enough, and `jaxrepro study --keep_checkpoints=dropoffs` keeps the one "
            "before each recorded drop-off"
        )
    return before[-1]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


# ----------------------------------------------------------------------------- batches


def arm_batch_ids(setup, phase, step: int, arm, restore: int, onset: int):
    """(ids, epochs) that ``arm`` trains on at ``step`` (see arms.py for each family)."""
    n = len(setup.data.train(phase.name))
    args = (phase.batch_size, n, setup.config.data.remainder)
    position = step - phase.start
    if arm.family == "skip" and step >= onset + arm.index:
        position += 1
    if arm.family == "order" and step >= restore:
        root = rng.branch_root(setup.roots["data"], arms_lib.ORDER_SALT + arm.index)
        return order_lib.redrawn_batch_ids(
            setup.data_key, order_lib.host_key(root), phase.name, position,
            restore - phase.start, *args,
        )  # fmt: skip
    return order_lib.batch_ids(setup.data_key, phase.name, position, *args)


# ----------------------------------------------------------------------------- one arm


class ArmRunner:
    """Runs arms of one phase from one restored state with the run's compiled programs."""

    def __init__(self, setup: RunSetup, programs: Programs, evaluator: Evaluator, phase):
        self.setup, self.programs, self.evaluator, self.phase = setup, programs, evaluator, phase
        self.aug_root, self.dropout_root = setup.keys(phase)

    def start(self, checkpoint_dir: str, restore: int):
        """(the restored state, its eval rows): the fixed cost of a diagnosis.

        The phase's train step is made ready for the restore target's shapes (the program
        cache's key; on a miss, the trace), then loaded or compiled in a thread while this
        one restores the checkpoint and evaluates it: the load is native code and leaves the
        interpreter to them (a trace is Python; beside the restore it would only slow both).
        Every arm starts from this state, so they share its eval rows.
        """
        setup, phase = self.setup, self.phase
        target, _ = setup.restore_target(restore)
        batch, _ = setup.device_batch(phase, restore)
        finish = self.programs.train_job(phase, target, batch)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
            compiling = pool.submit(finish)
            ckpts = Checkpoints(checkpoint_dir, read_only=True)
            try:
                state0, _ = setup.restore(ckpts, restore)
            finally:
                ckpts.close()
            first = []
            if _due(phase.eval_every, restore - phase.start):
                first = self.evaluator.evaluate(phase, state0, restore)
            compiling.result()  # its error, if any, is raised here
        return state0, first

    def run(
        self, state0, arm, restore: int, until: int, onset: int, first=(), progress=None
    ) -> list[dict]:
        """The rows of ``arm`` from ``restore`` to ``until``; ``first``: ``start``'s rows.

        Metrics are read in blocks, as the loop's record reads them; ``progress(step)``
        (optional) is told each time a block has been read.
        """
        setup, phase = self.setup, self.phase
        par = setup.par
        aug_root = self.aug_root
        if arm.family == "aug":
            aug_root = rng.branch_root(aug_root, arms_lib.AUG_SALT + arm.index)
        keys = par.replicate((aug_root, self.dropout_root))
        controls = par.replicate(step_controls(arm.lr_scale, arm.clip_norm))
        state = jax.tree.map(lambda a: a.copy(), state0)  # the step donates its state
        rows, pending, stopped = [], [], False
        policy = setup.config.train.nonfinite_policy

        def read(count=None):
            nonlocal stopped
            block = pending[:count] if count is not None else list(pending)
            del pending[: len(block)]
            for s, epoch, m in block:
                if stopped:
                    break
                m = unpack_metrics(np.asarray(m))
                if policy == "stop" and not m["finite"]:
                    stopped = True
                if is_logged(phase, s) or stopped:
                    rows.append(train_row(phase, s, epoch, m))
            if block and progress is not None:
                progress(block[-1][0] + 1)

        for s in range(restore, until):
            if s == restore:
                rows.extend(first)
            elif _due(phase.eval_every, s - phase.start):
                read()
                if stopped:
                    break
                rows.extend(self.evaluator.evaluate(phase, state, s))
            ids, epochs = arm_batch_ids(setup, phase, s, arm, restore, onset)
            batch, epoch = setup.device_batch_of(phase, ids, epochs)
            fn = self.programs.train_fn(phase, state, batch)
            state, m = fn(state, batch, *keys, controls)
            pending.append((s, epoch, m))
            if len(pending) >= 2 * FETCH_BLOCK:
                read(FETCH_BLOCK)  # while the newer steps compute
        read()
        if not stopped:
            rows.extend(self.evaluator.evaluate(phase, state, until))
        return rows


def _due(every: int, phase_step: int) -> bool:
    return phase_step == 0 or (every > 0 and phase_step % every == 0)


# ----------------------------------------------------------------------------- outcomes


def _peak(rows, event, window: int, until: int) -> dict:
    """The arm's largest loss and lowest target accuracy around the onset."""
    phase, onset = event["phase"], int(event["step"])
    split = figure_lib.SPLIT_OF_PHASE.get(phase, "target_test")
    near = [r for r in rows if r["phase"] == phase and onset - window <= r["step"] <= until]
    losses = [r["loss"] for r in near if r["kind"] == "train" and np.isfinite(r["loss"])]
    accs = [r["accuracy"] for r in near if r["kind"] == "eval" and r.get("split") == split]
    return {
        "peak_loss": max(losses) if losses else None,
        "min_accuracy": min(accs) if accs else None,
    }


def outcome(arm, rows, history, event, cfg, window: int, restore: int, until: int) -> dict:
    """Did the event recur in this arm, and how large was it."""
    episodes = [e for e in dropoff_lib.detect([*history, *rows], cfg) if e["step"] >= restore]
    match = verdict_lib.recurs(event, episodes, window)
    return {
        "arm": arm.name,
        "family": arm.family,
        "recurred": match is not None,
        "match": match,
        "episodes": episodes,
        **_peak(rows, event, window, until),
    }


# ----------------------------------------------------------------------------- the command


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise WorkdirError(f"another diagnosis of this run holds {path}") from e
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def event_name(index: int, event: dict) -> str:
    return f"{index}_{event['phase']}_{event['metric']}_{event['kind']}_step{event['step']}"


def diagnose(
    run_dir: str,
    *,
    dropoff="all",
    arms: str = arms_lib.DEFAULT_ARMS,
    after: int | None = None,
    window: int | None = None,
    force: bool = False,
    max_events: int | None = None,
) -> list[dict]:
    """Diagnoses the run's drop-off(s); returns one diagnosis dict per event.

    Everything the user can get wrong is checked before any work: the arms, the event
    index, the checkpoints before each onset, the platform (``force`` goes on, recorded).
    ``max_events``: with ``dropoff='all'``, the most severe this many.
    """
    ws = Workdir(run_dir)
    if not ws.exists():
        raise WorkdirError(f"{run_dir} is not a jaxrepro run (no config.json)")
    arm_list = arms_lib.parse_arms(arms)
    config = config_lib.from_dict(ws.stored_config())
    after = _positive_int(config.diagnose.after if after is None else after, "--after")
    window = _positive_int(config.diagnose.window if window is None else window, "--window")
    events = dropoff_lib.load_dropoffs(ws.path)
    indices = select_events(events, dropoff)
    if max_events is not None and len(indices) > max_events:
        ranked = sorted(indices, key=lambda i: -dropoff_lib.severity(events[i]))
        indices = sorted(ranked[:max_events])
    if not os.path.isdir(ws.checkpoint_dir):
        raise CheckpointError(f"{run_dir} has no checkpoints to restore from")
    ckpts = Checkpoints(ws.checkpoint_dir, read_only=True)
    available = ckpts.steps()
    ckpts.close()
    plans = [(i, events[i], restore_step(events[i], available, config)) for i in indices]
    for i, event, restore in plans:
        for arm in arm_list:
            if arm.family == "skip" and int(event["step"]) + arm.index < restore:
                raise ConfigError(
                    f"--arms: {arm.name} would skip step {int(event['step']) + arm.index}, "
                    f"before drop-off {i}'s restore point (checkpoint {restore})"
                )
    run_info = ws.read_run()
    current = runinfo.platform_info(portable=config.determinism.portable)
    platform = machine.compare_platforms(
        run_info.get("platform") or {}, current, force=force, what=f"diagnosis of {run_dir}"
    )
    root = os.path.join(ws.path, DIR)
    with _locked(os.path.join(root, ".lock")):
        t0 = time.perf_counter()
        setup = RunSetup(config)
        programs = Programs(setup)
        evaluator = Evaluator(setup, programs)
        original = ws.metrics()
        setup_s = round(time.perf_counter() - t0, 3)
        out = []
        for index, event, restore in plans:
            diag = _diagnose_event(
                ws, setup, programs, evaluator, original, index, event, restore,
                arm_list, after, window, platform, config, setup_s,
            )  # fmt: skip
            out.append(diag)
        _write_summary(root, out, time.perf_counter() - t0)
    return out


def _diagnose_event(
    ws, setup, programs, evaluator, original, index, event, restore, arm_list, after, window,
    platform, config, setup_s,
) -> dict:  # fmt: skip
    name = event_name(index, event)
    d = os.path.join(ws.path, DIR, name)
    os.makedirs(os.path.join(d, "arms"), exist_ok=True)
    t0 = time.perf_counter()
    phase = setup.phase_of(restore)
    if phase.name != event["phase"]:
        raise CheckpointError(
            f"the last checkpoint before the drop-off at step {event['step']} ({event['phase']}) "
            f"is step {restore}, in {phase.name}: an arm does not cross a phase boundary"
        )
    onset = int(event["step"])
    confirmed = int(event.get("confirmed_step", onset))
    until = min(max(onset + after, confirmed + 1), phase.end)
    history = [r for r in original if r["step"] < restore]
    runner = ArmRunner(setup, programs, evaluator, phase)
    arm_rows, timing, state0, first = {}, {"arms": {}, "setup_s": setup_s}, None, []
    paths = {arm.name: os.path.join(d, "arms", f"{arm.name}.jsonl") for arm in arm_list}
    todo = [arm for arm in arm_list if not os.path.exists(paths[arm.name])]
    steps = until - restore
    if todo:  # restore, compile and the restored state's eval: the fixed cost
        state0, first = runner.start(ws.checkpoint_dir, restore)
        timing["fixed_s"] = round(time.perf_counter() - t0, 3)
    progress = Progress(
        f"diagnose {index}",
        0,
        len(todo) * steps,
        mode=config.runtime.progress,
        every_s=config.runtime.progress_every_s,
    )
    try:
        for arm in arm_list:
            path = paths[arm.name]
            if arm not in todo:  # finished before an interruption
                arm_rows[arm.name] = jsonio.read_jsonl(path)
                continue
            start, done = time.perf_counter(), todo.index(arm) * steps

            def told(step, arm=arm, done=done):
                progress.advance(done + step - restore, f"arm {arm.name}, step {step}/{until}")

            rows = runner.run(state0, arm, restore, until, onset, first, told)
            timing["arms"][arm.name] = round(time.perf_counter() - start, 3)
            jsonio.write_jsonl(path, rows)
            arm_rows[arm.name] = rows
    finally:
        progress.close()
    outcomes = [
        outcome(a, arm_rows[a.name], history, event, config.dropoff, window, restore, until)
        for a in arm_list
    ]
    exact = None
    if "exact" in arm_rows:
        exact = trajectory.compare(original, arm_rows["exact"], start=restore, until=until)
    exact_bitwise = None if exact is None else exact["bitwise_equal"]
    v = verdict_lib.verdict(outcomes, exact_bitwise=exact_bitwise)
    diag = {
        "index": index,
        "name": name,
        "event": event,
        "restore_step": restore,
        "until": until,
        "after": after,
        "window": window,
        "arms": [{k: o[k] for k in o if k != "episodes"} for o in outcomes],
        "exact_bitwise": exact_bitwise,
        "exact_first_difference": None if exact is None else exact["first_difference"],
        "verdict": v,
        "platform_check": platform,
        "timing": timing,
        "steps_per_arm": until - restore,
        "compile_time_s": dict(programs.compile_s),
        "programs": dict(programs.how),
    }
    diag["figure"] = figure_lib.draw(original, arm_rows, event, diag, os.path.join(d, "figure"))
    diag["figure"] = os.path.relpath(diag["figure"], d)
    jsonio.write_json(os.path.join(d, "diagnosis.json"), diag)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(figure_lib.summary_markdown(diag))
    log.info("diagnosis of drop-off %d: %s (%s)", index, v["cause"], v["because"])
    return diag


def _write_summary(root: str, diags: list[dict], wall: float) -> None:
    lines = [
        "# Diagnoses",
        "",
        "Each drop-off replayed from the checkpoint before it, with one thing changed per arm; "
        f"the verdict rules are in each event's summary. Wall time {wall:.0f} s.",
        "",
        "| drop-off | verdict | because | exact bitwise |",
        "| --- | --- | --- | --- |",
    ]
    for d in diags:
        e = d["event"]
        lines.append(
            f"| [{d['index']}: {e['kind']} of {e['metric']} at {e['step']} ({e['phase']})]"
            f"({d['name']}/summary.md) | {d['verdict']['cause']} | {d['verdict']['because']} | "
            f"{d['exact_bitwise']} |"
        )
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

r"""Seed studies: one run per seed of the varied factor(s), then statistics and a report.

    jaxrepro study --config=configs/digits.py --vary=aug --seeds=0-3 --out=results/NAME

* ``--vary=aug``: one run per seed, every other factor held at its base seed.
  ``--vary=aug,data`` (or ``all``): one factor at a time, the others held fixed (the
  design of Bouthillier et al. 2021); ``--vary=aug*data``: the full grid of seeds.
  ``dropout`` is a factor only for a model with ``model.dropout_rate > 0``: ``all``
  leaves it out otherwise, and naming it is refused before anything runs.
* ``--grid=data.augment.crop.padding=4,3`` (repeatable: the product): every grid point
  runs with every seed, so a study can hold the seeds fixed and vary the config.
* ``--design=configs/studies/paper.py[:variant]``: named arms, each its own factors, seeds
  and overrides, the first the baseline; a ``branch`` arm's runs replay the baseline run
  of the same seeds from the fine-tune start with its overrides (``jaxrepro.study.design``).

Before anything is written the study checks every arm's config and its disk: the worst
case of its checkpoints against the free space (``jaxrepro.study.disk``); by default
(``--keep_checkpoints=needed``) finished runs keep only what the study still needs.

Each run is a separate ``jaxrepro train`` process (a local pool of ``--parallel``), into
``OUT/runs/NAME``; ``OUT/jobs.txt`` holds one shell command per run, its paths relative
to OUT (``--jobs_only`` writes it and stops, for a cluster). The base config, with every
override the user gave, is ``OUT/study_config.json``, loaded by the generated
``OUT/study_config.py``. A study restarted with the same arguments skips its finished runs;
an ``--out`` that holds another study is refused. Then: statistics, attribution of
drop-offs, figures, an exact replay of the largest drop-off, ``OUT/report.md`` and
``OUT/summary.json``.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shlex
import sys
import time

from jaxrepro import config as config_lib
from jaxrepro.errors import ConfigError, JaxreproError
from jaxrepro.plumbing import jsonio
from jaxrepro.report import report as report_lib
from jaxrepro.study import design as design_lib
from jaxrepro.study import disk
from jaxrepro.study.analysis import analyze, largest_event, replay_failure, severity
from jaxrepro.study.plan import (
    FINISHED,
    SESSIONS_FILE,
    STUDY_FILE,
    Run,
    Spec,
    copy_config,
    job_argv,
    make_spec,
    parse_grid,
    parse_seeds,
    parse_vary,
    plan_runs,
    prepare_out,
    run_status,
    write_jobs,
)
from jaxrepro.study.pool import WAIT, StudyInterrupted, run_pool
from jaxrepro.study.progress import StudyProgress

__all__ = [
    "FINISHED",
    "STUDY_FILE",
    "Run",
    "Spec",
    "StudyInterrupted",
    "analyze",
    "copy_config",
    "job_argv",
    "largest_event",
    "main_from_flags",
    "make_spec",
    "parse_grid",
    "parse_seeds",
    "parse_vary",
    "plan_runs",
    "prepare_out",
    "prune_checkpoints",
    "replay_failure",
    "run_study",
    "severity",
    "source_hash",
]

log = logging.getLogger("jaxrepro")
KEEP_CHECKPOINTS = disk.POLICIES
_ANALYSIS_ONLY = ("study", "report", "__pycache__")


def source_hash() -> str:
    """sha256 of the source a run executes: a study notices code edited while it ran.

    All of jaxrepro but study/ and report/, which only read what runs wrote (so a report
    can be redrawn by newer code). run.json's git commit cannot tell: an uncommitted edit
    leaves it unchanged.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if folder != root or d not in _ANALYSIS_ONLY)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _session(out: str, row: dict) -> list[dict]:
    path = os.path.join(out, SESSIONS_FILE)
    rows = jsonio.read_jsonl(path) + [row]
    jsonio.write_jsonl(path, rows)
    return rows


def run_study(
    config,
    out: str,
    *,
    vary=None,
    seeds=None,
    grid=(),
    design=None,
    arms=None,
    parallel: int = 1,
    jobs_only: bool = False,
    replay: bool = True,
    replay_metric: str | None = None,
    diagnose: int = 1,
    keep_checkpoints: str = "needed",
    window: int = 5,
    k_last: int = 3,
    n_boot: int = 2000,
    command: str | None = None,
    python: str | None = None,
    env: dict | None = None,
    force: bool = False,
) -> dict:
    """Runs (or resumes) a seed study into ``out``; returns the summary (also summary.json).

    Args:
        config: the base config (a locked ConfigDict, the user's overrides applied); with
            ``design``, None takes the design file's.
        out: the study's directory.
        vary: ``aug`` | ``aug,data`` | ``all`` | ``aug*data``.
        seeds: ``0-7`` | ``0,1,5`` (or a list of ints).
        grid: ``["dotted.key=v1,v2", ...]``; every grid point runs every seed.
        design: a design file ``FILE[:variant]`` (jaxrepro.study.design) instead of
            ``vary``/``seeds``/``grid``: its arms, the first the baseline.
        arms: only these arms of the design (``a,b`` or a list).
        parallel: runs at once (separate processes).
        jobs_only: write OUT/jobs.txt and study.json and run nothing.
        replay: exactly replay the largest drop-off after the runs.
        replay_metric: only consider drop-offs whose metric starts with this (e.g. 'loss').
        diagnose: diagnose this many of the most severe drop-offs (jaxrepro.diagnose, the
            default arms); 0: none.
        keep_checkpoints: ``needed`` (the default), ``dropoffs`` or ``all``
            (jaxrepro.study.disk): which checkpoints finished runs keep.
        window: steps within which drop-offs of different runs are one event.
        k_last: final metrics also as the mean of the last ``k_last`` evals.
        n_boot: bootstrap resamples.
        command: the command line recorded in the report.
        python: the interpreter of the runs (default: this one).
        env: extra environment variables of the runs.
        force: go on although finished runs were recorded on another platform fingerprint.

    Everything the arguments name is checked before anything is written: the design,
    every arm's or grid point's config, and the free disk space against the worst case.

    Returns:
        The summary dict; with ``jobs_only``, ``{"jobs": path, "runs": [...]}``.
    """
    t0, started = time.time(), datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if keep_checkpoints not in disk.POLICIES:
        raise ConfigError(
            f"--keep_checkpoints={keep_checkpoints!r}: expected one of {', '.join(disk.POLICIES)}"
        )
    if not out:
        raise ConfigError("--out is required: the study's directory")
    out = os.path.abspath(out)
    config, spec, runs, description = _plan(config, vary, seeds, grid, design, arms)
    shapes = {}
    if not jobs_only:  # the worst case, before anything is written
        cache = {}
        shapes = {r.name: disk.run_shape(_run_config(config, r, runs), cache) for r in runs}
        estimate = disk.worst_case(
            runs, shapes, keep_checkpoints, parallel, diagnose=diagnose, replay=replay
        )
        disk_info = disk.check_free(out, estimate)
    prepare_out(config, spec, runs, out)
    jobs = write_jobs(out, runs, python)
    if jobs_only:
        log.info("study: %d jobs written to %s; nothing run", len(runs), jobs)
        if any(r.branch for r in runs):
            log.info("study: a branch's line needs its baseline run finished first")
        return {"jobs": jobs, "runs": [r.name for r in runs]}
    todo = [r for r in runs if run_status(out, r) not in FINISHED]
    mixed = _platform_check(config, out, [r for r in runs if r not in todo], force)
    session = {
        "started": started,
        "code_at_start": source_hash(),
        "launched": [r.name for r in todo],
        "skipped": [r.name for r in runs if r not in todo],
    }
    if mixed:
        session["platform_differences"] = mixed
    log.info(
        "study: %d runs, %d finished already, %d to run",
        len(runs),
        len(runs) - len(todo),
        len(todo),
    )
    keep = dict(diagnose=diagnose, replay=replay, replay_metric=replay_metric)
    peak = [disk.usage(out)["checkpoint_bytes"]]
    pruned = {}

    def on_exit(run, code):
        peak[0] = max(peak[0], disk.usage(out)["checkpoint_bytes"])
        try:
            disk.merge_pruned(pruned, disk.prune(out, runs, keep_checkpoints, **keep))
        except JaxreproError as e:  # a checkpoint that cannot be listed: keep it, say so
            log.warning("study: checkpoints not pruned after %s: %s", run.name, e)

    progress = StudyProgress(
        out, [r.name for r in runs], session["skipped"], parallel, config.runtime.progress_every_s
    )
    try:
        codes = run_pool(
            out, todo, parallel, python, env, ready=_branch_ready(out, runs), on_exit=on_exit,
            progress=progress,
        )  # fmt: skip
    except BaseException:
        _session(out, dict(session, interrupted=True, wall_s=round(time.time() - t0, 1)))
        raise
    session["failed"] = [r.name for r in todo if run_status(out, r) not in FINISHED]
    session["exit_codes"] = codes
    summary = analyze(
        out,
        config,
        spec,
        runs,
        window=window,
        k_last=k_last,
        n_boot=n_boot,
        replay=replay,
        replay_metric=replay_metric,
        diagnose=diagnose,
        python=python,
        env=env,
    )
    peak[0] = max(peak[0], disk.usage(out)["checkpoint_bytes"])
    disk.merge_pruned(pruned, disk.prune(out, runs, keep_checkpoints, final=True, **keep))
    if keep_checkpoints != "all":
        summary["pruned_checkpoints"] = pruned
    disk_info.update(peak_bytes=peak[0], end=disk.usage(out))
    disk_info["line"] = disk.summary_line(disk_info)
    summary["disk"] = disk_info
    if spec.design == "arms":
        summary["arm_runs"] = _arms_summary(spec, runs)
        summary["design_description"] = description
    end = dict(session, code_at_end=source_hash(), wall_s=round(time.time() - t0, 1))
    sessions = _session(out, end)
    summary["sessions"] = sessions
    codes_seen = {c for r in sessions for c in (r.get("code_at_start"), r.get("code_at_end"))}
    summary["code_changed"] = len(codes_seen - {None}) > 1
    summary["wall_time_s"] = round(sum(s.get("wall_s", 0.0) for s in sessions), 1)
    summary["command"] = command
    summary["report"] = "report.md"
    jsonio.write_json(os.path.join(out, "summary.json"), summary)
    report_lib.write_report(out, summary)
    return summary


def _plan(config, vary, seeds, grid, design, arms):
    """(base config, spec, runs, the design's description or None) of the arguments, every
    config checked; nothing written."""
    if design is not None:
        given = [n for n, v in (("--vary", vary), ("--seeds", seeds), ("--grid", grid)) if v]
        if given:
            raise ConfigError(
                f"--design names its arms' factors, seeds and overrides: drop {', '.join(given)}"
            )
        d = design_lib.select(design_lib.load(design), arms)
        config = design_lib.base_config(d, config)
        return config, design_lib.spec_of(d), design_lib.plan_design(config, d), d.description
    if arms:
        raise ConfigError("--arms selects arms of a --design file; this study has none")
    if config is None:
        raise ConfigError("--config is required (or --design=FILE)")
    config_lib.validate(config)
    spec = make_spec(vary, seeds, grid, config)
    return config, spec, plan_runs(config, spec), None


def _run_config(config, run: Run, runs: list[Run]):
    """The config one run trains with (a branch: its baseline's with its overrides)."""
    cfg = copy_config(config)
    if run.branch is not None:
        base = next(r for r in runs if r.name == run.branch["run"])
        for k, v in base.overrides:
            config_lib.apply_override(cfg, k, v)
    for k, v in run.overrides:
        config_lib.apply_override(cfg, k, v)
    return cfg


def _branch_ready(out: str, runs: list[Run]):
    """The pool's test of a run: None (start it), WAIT, or why it cannot run."""
    by_name = {r.name: r for r in runs}

    def ready(run: Run, busy) -> str | None:
        if run.branch is None:
            return None
        base = run.branch["run"]
        if base in busy:
            return WAIT
        status = run_status(out, by_name[base])
        if status not in FINISHED:
            return f"its baseline run {base} has not finished ({status or 'not started'})"
        info = jsonio.read_json(os.path.join(out, "runs", base, "run.json"))
        start = (info.get("phases") or {}).get("finetune", {}).get("start")
        step = run.branch["from_step"]
        if start != step:
            return f"{base} starts fine-tuning at step {start}, not at the planned {step}"
        from jaxrepro.checkpoints import Checkpoints

        ckpt_dir = os.path.join(out, "runs", base, "checkpoints")
        steps = Checkpoints(ckpt_dir, read_only=True).steps() if os.path.isdir(ckpt_dir) else []
        if step not in steps:
            return (
                f"{base} has no checkpoint at its fine-tune start (step {step}; it has "
                f"{steps}): it was run without checkpoint.keep_phase_starts"
            )
        return None

    return ready


def _arms_summary(spec, runs: list[Run]) -> list[dict]:
    """Each arm: its definition and runs (a branch arm: which baseline run and checkpoint
    each of its runs branched from)."""
    out = []
    for arm in spec.arms:
        mine = [r for r in runs if r.arm == arm["name"]]
        entry = dict(arm, runs=[r.name for r in mine], baseline=arm is spec.arms[0])
        if arm["branch"]:
            entry["branched_from"] = {r.name: r.branch for r in mine}
        out.append(entry)
    return out


def prune_checkpoints(out: str, runs, policy: str = "dropoffs", **keep) -> dict:
    """Deletes the checkpoints of ``runs`` that ``policy`` (jaxrepro.study.disk) does not
    keep; returns ``{run: {"kept": [...], "deleted": [...]}}`` of the runs it touched."""
    return disk.prune(out, runs, policy, **keep)


def _command_line() -> str:
    """The command as typed, for the report; an absolute path in a flag is shown relative
    to the current directory when inside it (no machine's path in the results)."""
    from jaxrepro.workdir import shown

    args = []
    for arg in sys.argv[1:]:
        flag, eq, value = arg.partition("=")
        if eq and os.path.isabs(value):
            arg = f"{flag}={shown(value)}"
        args.append(arg)
    return "python -m jaxrepro " + shlex.join(args)


def _platform_check(config, out: str, finished: list[Run], force: bool) -> dict:
    """Finished runs recorded on another platform fingerprint than this machine's runs get.

    Refuses (before any run starts) unless ``force``; returns {run: differences}.
    """
    from jaxrepro import machine
    from jaxrepro.train import runinfo

    if not finished:
        return {}
    here = runinfo.platform_info(portable=config.determinism.portable)
    env = {"XLA_FLAGS": here["xla_flags"]}
    machine.apply_portable(config.determinism.portable, env)  # what the runs' processes get
    here["xla_flags"] = env["XLA_FLAGS"]
    mine = machine.fingerprint(here)
    mixed = {}
    for r in finished:
        path = os.path.join(out, "runs", r.name, "run.json")
        recorded = (jsonio.read_json(path) if os.path.isfile(path) else {}).get("platform")
        diffs = machine.differences(machine.fingerprint(recorded), mine) if recorded else []
        if diffs:
            mixed[r.name] = diffs
    if mixed and not force:
        first = next(iter(mixed))
        raise machine.PlatformMismatch(
            f"study {out}: {len(mixed)} finished run(s) were made on another platform "
            f"({first}: {'; '.join(mixed[first])}), so new runs here would not be comparable "
            "bit for bit; pass --force to mix platforms anyway (the report counts them)"
        )
    return mixed


def main_from_flags(flags, config) -> int:
    """``jaxrepro study``: the thin wrapper over :func:`run_study`."""
    summary = run_study(
        config,
        flags.out,
        vary=flags.vary,
        seeds=flags.seeds,
        grid=flags.grid,
        design=getattr(flags, "design", None),
        arms=getattr(flags, "arms", None),
        parallel=flags.parallel,
        jobs_only=flags.jobs_only,
        replay=getattr(flags, "study_replay", True),
        diagnose=getattr(flags, "study_diagnose", 1),
        keep_checkpoints=getattr(flags, "keep_checkpoints", "needed"),
        command=_command_line(),
        force=getattr(flags, "force", False),
    )
    if flags.jobs_only:
        print(f"{len(summary['runs'])} jobs: {summary['jobs']}")
        return 0
    out = os.path.abspath(flags.out)
    missing = summary["missing_runs"]
    print(f"{len(summary['runs'])} runs finished, {len(missing)} not: {', '.join(missing) or '-'}")
    print(f"report: {os.path.join(out, 'report.md')}  summary: {os.path.join(out, 'summary.json')}")
    print(summary["disk"]["line"])
    failure = replay_failure(summary["replay"])
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if missing or failure else 0

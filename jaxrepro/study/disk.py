"""A study's disk: checkpoint size from shapes, the worst case, refusal, retention.

Checkpoints are a study's largest files (a ResNet-50 train state, weights and Adam's two
moments, is ~270 MB). Policies (``--keep_checkpoints``):

* ``needed`` (the default): what the study's report and diagnoses still need. As each
  run ends it keeps its last checkpoint and the one before each drop-off that is still
  among the candidates for the study's exact replay and diagnoses (an event pushed out of
  the top ``diagnose`` by more severe ones can never come back, so its checkpoint goes at
  once), and a baseline run keeps its fine-tune start until its branches are done. After
  the replay and the diagnoses, only each run's last checkpoint stays (and those of
  events whose diagnosis failed), and the replay's own are deleted.
* ``dropoffs``: each finished run keeps its last checkpoint and the one before every
  drop-off: every drop-off stays replayable.
* ``all``: the study deletes nothing (each run's own retention still applies).

Before any run starts the study estimates its worst case (:func:`worst_case`) and refuses
to start when the free space cannot hold it.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np

from jaxrepro import dropoff as dropoff_lib
from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import jsonio
from jaxrepro.study.plan import FINISHED, Run, run_status

log = logging.getLogger("jaxrepro")
POLICIES = ("needed", "dropoffs", "all")


class DiskError(JaxreproError):
    """The free space cannot hold the study's worst case."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------- estimate


def _bytes_key(config) -> str:
    """What a checkpoint's size depends on: the network's shapes and dtype, the datasets'
    label sets, the image size, and the structure of the fine-tune optimizer's state (a
    frozen backbone has none; a backbone lr multiplier a second Adam's counters).
    Clipping and weight decay add no arrays."""
    m, d, ft = config.model, config.data, config.finetune
    return jsonio.dumps(
        [
            m.name, m.stem, m.width, m.dtype, d.image_size, d.source.name, d.target.name,
            ft.freeze_backbone, ft.backbone_lr_mult == 1.0, ft.new_head, config.init_from,
        ]
    )  # fmt: skip


def _split_length(config, role: str, cache: dict) -> int:
    from jaxrepro import data as data_lib

    d = config.data
    name, split = d[role].name, d[role].train_split
    key = ("len", name, split, d.data_dir)
    if key not in cache:
        kw = dict(data_dir=d.data_dir, image_size=d.image_size, max_in_memory_bytes=0)
        cache[key] = len(data_lib.load(name, split, **kw))
    return cache[key]


def _phases(config, cache: dict) -> dict:
    """Phase name -> {"start", "steps"}, from the config and the datasets' sizes."""
    from jaxrepro.train.setup import phase_steps

    out, start = {}, 0
    for name, role in (("pretrain", "source"), ("finetune", "target")):
        p = config[name]
        n = _split_length(config, role, cache) if p.steps is None and p.epochs else 0
        steps = phase_steps(config, name, n)
        out[name] = {"start": start, "steps": steps}
        start += steps
    return out


def _state_bytes(config, cache: dict) -> int:
    """Bytes of the larger phase's train state (weights, BatchNorm statistics, optimizer
    state, counters), from shapes alone: what a checkpoint holds."""
    key = ("bytes", _bytes_key(config))
    if key in cache:
        return cache[key]
    from jaxrepro.study.plan import copy_config
    from jaxrepro.train import state as state_lib
    from jaxrepro.train.setup import RunSetup

    light = copy_config(config)
    light.runtime.max_in_memory_mb = 0  # shapes and lengths only: decode nothing up front
    setup = RunSetup(light)
    shape = setup.abstract_init_state()
    states = [shape]
    if len(setup.phases) > 1 and setup.first_phase().name == "pretrain":
        ft = setup.phase_named("finetune")
        states.append(
            jax.eval_shape(lambda s: state_lib.to_finetune(light, setup.seeds, s, ft), shape)
        )
    cache[key] = max(
        sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(s))
        for s in states
    )
    return cache[key]


def run_shape(config, cache: dict | None = None) -> dict:
    """A run's checkpoint bytes and checkpoint steps, from shapes alone (no training).

    Steps: every ``checkpoint.every`` global step, each phase's start, and the end (as
    the training loop saves). ``cache`` is shared across calls (configs that differ only
    in what does not change these share the work).
    """
    cache = {} if cache is None else cache
    phases = _phases(config, cache)
    every, total = config.checkpoint.every, sum(p["steps"] for p in phases.values())
    steps = {total}
    for p in phases.values():
        if p["steps"]:
            end = p["start"] + p["steps"]
            steps.add(p["start"])
            steps |= {s for s in range(p["start"], end) if every and s % every == 0}
    return {"bytes": _state_bytes(config, cache), "steps": sorted(steps), "phases": phases}


def worst_case(
    runs: list[Run],
    shapes: dict,
    policy: str,
    parallel: int,
    *,
    diagnose: int = 1,
    replay: bool = True,
) -> dict:
    """The most checkpoint bytes the study can hold at once, and how that is made up.

    ``shapes``: run name -> :func:`run_shape`. A run holds at most every checkpoint it
    writes (every one may precede a drop-off); a branch writes those from its branch
    point on. ``all`` and ``dropoffs`` keep them: the sum over runs. ``needed``: the
    ``parallel`` largest runs at full size while they run, one (the last) per finished
    run, the checkpoints before the replay's and the ``diagnose`` diagnoses' events, and
    each branched-from baseline run's fine-tune start.
    """

    def written(r: Run) -> list[int]:
        steps = shapes[r.name]["steps"]
        return [s for s in steps if r.branch is None or s >= r.branch["from_step"]]

    size = {r.name: shapes[r.name]["bytes"] for r in runs}
    full = {r.name: len(written(r)) * size[r.name] for r in runs}
    largest = max(size.values(), default=0)
    most = max((len(written(r)) for r in runs), default=0)
    replay_bytes = most * largest if replay else 0  # the exact replay's own, while it runs
    if policy in ("all", "dropoffs"):
        total = sum(full.values()) + replay_bytes
        how = (
            f"{len(runs)} runs x up to {most} checkpoints each (every one may precede a "
            f"drop-off) of {human(largest)}"
        )
    else:
        running = sorted(((full[n] - size[n]) for n in full), reverse=True)[:parallel]
        bases = {r.branch["run"] for r in runs if r.branch}
        events = (diagnose if diagnose > 0 else 0) + (1 if replay else 0)
        total = (
            sum(running)
            + sum(size.values())
            + events * largest
            + sum(size[b] for b in bases if b in size)
            + replay_bytes
        )
        how = (
            f"{min(parallel, len(runs))} running run(s) with up to {most} checkpoints, "
            f"the last of each of {len(runs)} runs, {events} before the replayed and "
            f"diagnosed drop-offs, {len(bases)} fine-tune starts of branched-from runs; a "
            f"checkpoint is {human(largest)}"
        )
    return {
        "policy": policy,
        "checkpoint_bytes": largest,
        "worst_case_bytes": int(total),
        "how": how,
    }


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def usage(out: str) -> dict:
    """Bytes under ``out``, and those and the count of its runs' checkpoints."""
    total = ckpt_bytes = count = 0
    for folder, dirs, files in os.walk(out):
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        total += size
        parts = os.path.relpath(folder, out).split(os.sep)
        if "checkpoints" in parts:
            ckpt_bytes += size
            if parts[-1] == "checkpoints":
                count += sum(d.isdigit() for d in dirs)
    return {"bytes": total, "checkpoint_bytes": ckpt_bytes, "checkpoints": count}


def check_free(out: str, estimate: dict) -> dict:
    """Refuses (DiskError, before anything is written) when the free space cannot hold
    the worst case less the checkpoints the study already holds; returns the figures."""
    free = free_bytes(out)
    held = usage(out)["checkpoint_bytes"] if os.path.isdir(out) else 0
    need = max(estimate["worst_case_bytes"] - held, 0)
    figures = dict(estimate, free_bytes_at_start=free, held_at_start_bytes=held)
    if need > free:
        already = f" (it holds {human(held)} already)" if held else ""
        hint = (
            "; the default --keep_checkpoints=needed holds far less"
            if estimate["policy"] != "needed"
            else "; fewer --parallel runs hold less"
        )
        raise DiskError(
            f"refusing to start: the study may hold up to {human(need + held)} of "
            f"checkpoints at once{already} ({estimate['how']}; --keep_checkpoints="
            f"{estimate['policy']}), but only {human(free)} are free at "
            f"{os.path.abspath(out)}; free {human(need - free)} or more{hint}"
        )
    return figures


# ----------------------------------------------------------------------------- retention


def _finished(out: str, runs: list[Run]) -> list[Run]:
    return [r for r in runs if run_status(out, r) in FINISHED]


def _records(out: str, runs: list[Run]) -> list[dict]:
    """Light records (run, workdir, events) of the finished full runs, in plan order."""
    return [
        {
            "run": r.name,
            "workdir": os.path.join(out, "runs", r.name),
            "events": dropoff_lib.load_dropoffs(os.path.join(out, "runs", r.name)),
        }
        for r in _finished(out, runs)
        if r.branch is None
    ]


def _replayed(record: dict, event: dict) -> bool:
    from jaxrepro.study.analysis import REPLAY_NAME

    path = os.path.join(record["workdir"], "replays", REPLAY_NAME, "replay_summary.json")
    return os.path.exists(path) and jsonio.read_json(path).get("event") == event


def _diagnosed(record: dict, index: int, event: dict) -> bool:
    from jaxrepro.diagnose import engine

    name = engine.event_name(index, event)
    return os.path.exists(os.path.join(record["workdir"], engine.DIR, name, "diagnosis.json"))


def needed_events(
    out: str, runs: list[Run], *, diagnose: int, replay: bool, replay_metric=None
) -> dict[str, list[int]]:
    """Run -> onset steps of the drop-offs whose checkpoints the study still needs: the
    current candidates for its exact replay and diagnoses, not yet replayed/diagnosed."""
    from jaxrepro.study.analysis import largest_event, most_severe

    records = _records(out, runs)
    keep: dict[str, list[int]] = {}
    if replay:
        found = largest_event(records, replay_metric)
        if found is not None and not _replayed(found[0], found[2]):
            keep.setdefault(found[0]["run"], []).append(found[2]["step"])
    for _, r, i, e in most_severe(records, diagnose):
        if not _diagnosed(r, i, e):
            keep.setdefault(r["run"], []).append(e["step"])
    return keep


def _pending_bases(out: str, runs: list[Run]) -> dict[str, int]:
    """Baseline run -> its fine-tune start step, while a branch from it is not finished."""
    return {
        r.branch["run"]: r.branch["from_step"]
        for r in runs
        if r.branch is not None and run_status(out, r) not in FINISHED
    }


def prune(
    out: str,
    runs: list[Run],
    policy: str,
    *,
    diagnose: int = 1,
    replay: bool = True,
    replay_metric=None,
    final: bool = False,
) -> dict:
    """Deletes the checkpoints of finished runs that ``policy`` no longer needs.

    Each finished run keeps its last checkpoint, the one before each drop-off the policy
    keeps, and (a baseline with unfinished branches) its fine-tune start. ``final``: the
    study's analysis is done, so (policy ``needed``) its replay's checkpoints go too.
    Unfinished runs are left alone (they resume from theirs). Returns ``{run: {"kept":
    [...], "deleted": [...]}}`` of the finished runs with checkpoints.
    """
    from jaxrepro.checkpoints import Checkpoints, protected_steps

    if policy == "all":
        return {}
    if policy == "needed":
        events = needed_events(
            out, runs, diagnose=diagnose, replay=replay, replay_metric=replay_metric
        )
    else:
        events = {
            r.name: [
                e["step"] for e in dropoff_lib.load_dropoffs(os.path.join(out, "runs", r.name))
            ]
            for r in runs
        }
    bases = _pending_bases(out, runs)
    result = {}
    for run in _finished(out, runs):
        ckpt_dir = os.path.join(out, "runs", run.name, "checkpoints")
        if not os.path.isdir(ckpt_dir):
            continue
        ckpts = Checkpoints(ckpt_dir)
        try:
            steps = ckpts.steps()
            keep = protected_steps(steps, events.get(run.name, []))
            if run.name in bases:
                keep.add(bases[run.name])
            deleted = ckpts.retain(1, 0, keep)
            result[run.name] = {"kept": ckpts.steps(), "deleted": deleted}
        finally:
            ckpts.close()
    if final and policy == "needed":
        from jaxrepro.study.analysis import REPLAY_NAME

        for run in _finished(out, runs):
            ckpt_dir = os.path.join(out, "runs", run.name, "replays", REPLAY_NAME, "checkpoints")
            if os.path.isdir(ckpt_dir):
                ckpts = Checkpoints(ckpt_dir)
                try:
                    deleted = ckpts.retain(0)
                finally:
                    ckpts.close()
                if deleted:
                    result[f"{run.name}/replays/{REPLAY_NAME}"] = {"kept": [], "deleted": deleted}
    n = sum(len(r["deleted"]) for r in result.values())
    if n:
        log.info("study: deleted %d checkpoint(s) that the study no longer needs (%s)", n, policy)
    return result


def summary_line(disk: dict) -> str:
    """The report's line on disk use."""
    end = disk.get("end", {})
    return (
        f"disk: {human(end.get('bytes', 0))} at the end, {human(end.get('checkpoint_bytes', 0))} "
        f"of it in {end.get('checkpoints', 0)} checkpoint(s) of {human(disk['checkpoint_bytes'])}"
        f" (--keep_checkpoints={disk['policy']}); at most {human(disk.get('peak_bytes', 0))} "
        f"of checkpoints seen at once, worst case estimated {human(disk['worst_case_bytes'])}"
    )


def merge_pruned(total: dict, new: dict) -> dict:
    """Adds one :func:`prune`'s result to the study's: the latest kept, every deleted."""
    for name, entry in new.items():
        old = total.get(name, {"deleted": []})
        total[name] = {"kept": entry["kept"], "deleted": sorted(old["deleted"] + entry["deleted"])}
    return total

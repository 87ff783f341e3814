"""After the runs: statistics, attribution of drop-offs, figures, the replay.

Finished runs are loaded into records (see ``jaxrepro.report.report``); shared
training-loss events get the example ids of the batch each run read there (from the
run's own config, through the engine's ``Runner.batch``); the largest drop-off of the
study is replayed exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

from jaxrepro import config as config_lib
from jaxrepro import dropoff as dropoff_lib
from jaxrepro import machine, rng, stats, trajectory
from jaxrepro.plumbing import jsonio
from jaxrepro.report import report as report_lib
from jaxrepro.study.plan import FINISHED, Run, Spec, run_status

REPLAY_NAME = "study_largest"
MAJORITY = 0.5  # events of at least this fraction of runs: list their batches


def _load(out: str, run: Run, k_last: int) -> dict:
    workdir = os.path.join(out, "runs", run.name)
    info = jsonio.read_json(os.path.join(workdir, "run.json"))
    rows = dropoff_lib.read_metrics(workdir)
    return {
        "run": run.name,
        "point": run.point,
        "arm": run.arm,
        "branch": run.branch,
        "varied_seeds": run.seeds,
        "seeds": info["seeds"],
        "status": info["status"],
        "workdir": workdir,
        "events": dropoff_lib.load_dropoffs(workdir),
        "summary": stats.run_summary(rows, k_last),
        "info": info,
    }


def _batch_ids(record: dict, phase: str, step: int, cache: dict) -> list[int]:
    """Example ids of the batch that train step ``step`` of ``phase`` read in this run."""
    from jaxrepro.train.setup import RunSetup

    config = jsonio.read_json(os.path.join(record["workdir"], "config.json"))
    config.pop("replay", None)  # a branch's origin: its batches are its config's
    # The order depends on the data seed and the config, not on the other seeds: runs that
    # share those share one run setup.
    rest = {k: v for k, v in config.items() if k not in ("seed", "seeds")}
    key = (record["seeds"]["data"], jsonio.dumps(rest, sort_keys=True))
    if key not in cache:
        cache[key] = RunSetup(config_lib.from_dict(config))
    setup = cache[key]
    ids, _ = setup.batch_ids(setup.phase_named(phase), step)
    return [int(i) for i in ids]


def _fill_example_ids(groups: list[dict], records: list[dict], cache: dict) -> None:
    """Training-loss events of most runs: the example ids of the batch each run read there.

    Shared events (every run) are the point; those of most runs (>= half) get them too,
    as the batch may be part of the cause there as well.
    """
    by_run = {r["run"]: r for r in records}
    for g in groups:
        if g["metric"] != "loss" or not (g["shared"] or g["fraction"] >= MAJORITY):
            continue
        batches = {}
        for e in g["events"]:
            ids = tuple(_batch_ids(by_run[e["run"]], g["phase"], e["step"], cache))
            entry = batches.setdefault(
                (e["step"], ids), {"step": e["step"], "ids": list(ids), "runs": []}
            )
            entry["runs"].append(e["run"])
        g["example_ids"] = list(batches.values())


def attribute(records: list[dict], factors, window: int) -> tuple[list[dict], str | None]:
    """Drop-off groups of one grid point with verdicts, or a note why there are none."""
    finished = [r for r in records if r["status"] in FINISHED]
    varied = [f for f in factors if len({r["seeds"][f] for r in finished}) > 1]
    if len(finished) < 2 or not varied:
        return [], "attribution needs >= 2 finished runs that differ in a varied seed"
    runs = [{"run": r["run"], "seeds": r["seeds"], "events": r["events"]} for r in finished]
    return stats.attribute_events(runs, varied, window), None


def severity(event: dict) -> float:
    """How bad a drop-off is, comparable across kinds (``jaxrepro.dropoff.severity``: the
    fraction of what the phase had learned that it gave back, times how long it lasted;
    a collapse to chance ~1, a one-batch spike ~0.05-0.1, a non-finite value 2)."""
    return dropoff_lib.severity(event)


def largest_event(records: list[dict], metric: str | None = None):
    """(record, index in its dropoffs.json, event) of the most severe drop-off, or None
    (ties: the earliest)."""
    best = None
    for r in records:
        for i, e in enumerate(r["events"]):
            if metric and not e["metric"].startswith(metric):
                continue
            key = (severity(e), -e["step"])
            if best is None or key > best[0]:
                best = (key, r, i, e)
    return None if best is None else best[1:]


def _run_replay(out: str, workdir: str, index: int, python, env) -> str | None:
    """Runs ``jaxrepro replay``; None when it wrote its summary, else why not."""
    argv = [
        python or sys.executable,
        "-m",
        "jaxrepro",
        "replay",
        f"--workdir={workdir}",
        f"--dropoff={index}",
        f"--name={REPLAY_NAME}",
    ]
    log_file = os.path.join(out, "logs", "replay.txt")
    with open(log_file, "a") as f:
        rc = subprocess.call(
            argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {}))
        )
    summary = os.path.join(workdir, "replays", REPLAY_NAME, "replay_summary.json")
    if rc in (0, 1) and os.path.exists(summary):  # 1: it ran, but not bit for bit
        return None
    with open(log_file) as f:
        errors = [line.strip() for line in f if line.startswith("error:")]
    return f"{errors[-1] if errors else f'exit status {rc}'}; see logs/replay.txt"


def _event_values(replayed: dict, event: dict) -> dict:
    """The event's metric at its step, in the original and in the replay (None: not replayed)."""
    kind, field, split = "train", "loss", None
    if event["metric"].startswith("accuracy/"):
        kind, field, split = "eval", "accuracy", event["metric"].split("/", 1)[1]
    for st in replayed.get("steps", []):
        key = (st["step"], st["kind"], st["phase"], st.get("split"))
        if key == (event["step"], kind, event["phase"], split):
            a, b = st["original"].get(field), st["replayed"].get(field)
            return {"original": a, "replayed": b, "reproduced": a is not None and a == b}
    return {"original": None, "replayed": None, "reproduced": False}


def replay_largest(
    out: str, records: list[dict], metric: str | None = None, python=None, env=None
) -> dict:
    """An exact replay of the largest drop-off, as a ``jaxrepro replay`` process.

    A process like the runs' own: the same platform setup and compile cache, so its bits
    are comparable with theirs (and it compiles nothing new). Output: OUT/logs/replay.txt.
    """
    found = largest_event(records, metric)
    if found is None:
        return {"skipped": "no drop-off was detected in any run"}
    record, index, event = found
    path = os.path.join(record["workdir"], "replays", REPLAY_NAME, "replay_summary.json")
    done = os.path.exists(path) and jsonio.read_json(path).get("event") == event
    if not done:  # a restarted study reuses its finished replay
        why = _run_replay(out, record["workdir"], index, python, env)
        if why is not None:
            return {
                "skipped": f"replay of {record['run']} drop-off {index} failed ({why})",
                "failed": True,
            }
    s = jsonio.read_json(path)
    keep = (
        "kind",
        "from_step",
        "until",
        "compared_rows",
        "missing_rows",
        "extra_rows",
        "bitwise_equal",
        "first_difference",
        "event_recurs",
        "status",
    )
    result = {k: s.get(k) for k in keep}
    where = os.path.relpath(os.path.dirname(path), out)  # not s["replay_dir"]: OUT may move
    figure = os.path.join(where, "replay_overlay.png")
    result.update(
        run=record["run"],
        dropoff=index,
        event=event,
        severity=severity(event),
        event_value=_event_values(s, event),
        replay_dir=where,
        figure=figure if os.path.exists(os.path.join(out, figure)) else None,
    )
    return result


def replay_failure(replay: dict) -> str | None:
    """Why a study's exact replay does not back it, or None when it does (or there was
    nothing to replay). A study whose replay failed or was not bit for bit has not shown
    its largest drop-off to be reproducible: ``jaxrepro study`` then exits non-zero."""
    if replay.get("failed"):
        return replay["skipped"]
    if replay.get("kind") != "exact" or replay.get("bitwise_equal"):
        return None
    e = replay["event"]
    return (
        f"the exact replay of run {replay['run']}, drop-off {replay['dropoff']} ({e['kind']} "
        f"of {e['metric']} at {e['phase']} step {e['step']}), is not bit for bit: "
        f"{replay['compared_rows']} rows compared, {len(replay.get('missing_rows') or [])} "
        f"missing in the replay, {len(replay.get('extra_rows') or [])} extra; first: "
        f"{trajectory.describe(replay['first_difference'])} "
        f"(see {replay['replay_dir']}/replay_summary.json)"
    )


def _environment(records: list[dict]) -> dict:
    if not records:
        return {}
    info = records[0]["info"]
    setups = {
        jsonio.dumps(machine.fingerprint(r["info"].get("platform", {})), sort_keys=True)
        for r in records
    }
    return {
        "libraries": info.get("libraries"),
        "platform": info.get("platform"),
        "code": info.get("code"),
        "distinct_setups": len(setups),
    }


def analyze(
    out: str,
    config,
    spec: Spec,
    runs: list[Run],
    *,
    window=5,
    k_last=3,
    n_boot=2000,
    replay=True,
    replay_metric=None,
    diagnose=1,
    python=None,
    env=None,
) -> dict:
    """Statistics, attribution, figures, the replay and the diagnoses of a study's runs.

    ``diagnose``: how many of the most severe drop-offs to diagnose (the budget).
    """
    records = [_load(out, r, k_last) for r in runs if run_status(out, r) in FINISHED]
    missing = [r.name for r in runs if run_status(out, r) not in FINISHED]
    points = {}
    cache = {}  # one run setup per data seed and config: batches' example ids
    for point in dict.fromkeys(r.point for r in runs):
        mine = [r for r in records if r["point"] == point]
        if not mine:
            continue
        entry = report_lib.point_statistics(mine, spec.factors, n_boot=n_boot)
        groups, note = attribute(mine, spec.factors, window)
        _fill_example_ids(groups, mine, cache)
        entry.update(attribution=groups, attribution_note=note)
        points[point] = entry
    by_point = {p: [r for r in records if r["point"] == p] for p in points}
    summary = {
        "study": dict(spec.to_dict(), n_runs=len(runs), window=window, k_last=k_last),
        "held_fixed": {f: s for f, s in rng.resolve_seeds(config).items() if f not in spec.factors},
        "config": report_lib.config_digest(config_lib.to_dict(config)),
        "environment": _environment(records),
        "runs": [report_lib.run_row(r) for r in records],
        "missing_runs": missing,
        "points": points,
        "arms": report_lib.arm_statistics(records),
        "figures": report_lib.draw_figures(out, by_point, k_last),
    }
    full = replayable(records)
    summary["replay"] = (
        replay_largest(out, full, replay_metric, python, env)
        if replay
        else {"skipped": "replay disabled"}
    )
    summary["diagnoses"] = diagnose_most_severe(out, full, diagnose, python, env)
    return summary


def most_severe(records: list[dict], budget: int) -> list[tuple]:
    """(severity, record, index, event) of the ``budget`` most severe drop-offs (ties: by
    run name, then index). Adding records can only push an event out of this list, never
    bring one back: a study frees the checkpoints of events that fell out as it goes."""
    events = [(severity(e), r, i, e) for r in records for i, e in enumerate(r["events"])]
    return sorted(events, key=lambda t: (-t[0], t[1]["run"], t[2]))[: max(budget, 0)]


def replayable(records: list[dict]) -> list[dict]:
    """The records whose drop-offs the study replays and diagnoses: full runs (a branch's
    checkpoints start at its branch point, and its config is its baseline's)."""
    return [r for r in records if not r.get("branch")]


def diagnose_most_severe(out: str, records: list[dict], budget: int, python=None, env=None):
    """The ``budget`` most severe drop-offs of the study, each diagnosed with the default
    arms by a ``jaxrepro diagnose`` process like the runs' own (logs/diagnose.txt). A
    restarted study reuses a finished diagnosis (and the diagnosis its finished arms)."""
    from jaxrepro.diagnose import engine

    events = [(severity(e), r, i, e) for r in records for i, e in enumerate(r["events"])]
    base = {"budget": budget, "n_events": len(events), "diagnosed": []}
    if budget <= 0:
        return dict(base, skipped="diagnosis disabled")
    if not events:
        return dict(base, skipped="no drop-off was detected in any run")
    chosen = most_severe(records, budget)
    for sev, r, i, e in chosen:
        where = os.path.join(r["workdir"], engine.DIR, engine.event_name(i, e))
        path = os.path.join(where, "diagnosis.json")
        if not os.path.exists(path):
            argv = [python or sys.executable, "-m", "jaxrepro", "diagnose",
                    f"--workdir={r['workdir']}", f"--dropoff={i}"]  # fmt: skip
            with open(os.path.join(out, "logs", "diagnose.txt"), "a") as f:
                subprocess.call(
                    argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {}))
                )
        entry = {"run": r["run"], "index": i, "event": e, "severity": sev}
        if not os.path.exists(path):
            base["diagnosed"].append(dict(entry, failed="see logs/diagnose.txt"))
            continue
        d = jsonio.read_json(path)
        rel = os.path.relpath(where, out)
        base["diagnosed"].append(
            dict(
                entry,
                cause=d["verdict"]["cause"],
                rule=d["verdict"]["rule"],
                because=d["verdict"]["because"],
                remedies=d["verdict"]["remedies"],
                families=d["verdict"]["families"],
                exact_bitwise=d["exact_bitwise"],
                restore_step=d["restore_step"],
                until=d["until"],
                window=d["window"],
                summary=os.path.join(rel, "summary.md"),
                figure=os.path.join(rel, d["figure"]),
            )
        )
    return base

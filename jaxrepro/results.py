"""A study (or one run) as tidy pandas DataFrames, for a notebook.

    from jaxrepro import results
    r = results.load("runs/digits_aug")
    r.metrics   # one row per metrics.jsonl row: run, arm, seed_<factor>..., kind, step, phase, ...
    r.events    # one row per drop-off (dropoffs.json), with the same run columns
    r.runs      # one row per run: its state, steps, hashes, wall time, drop-off count
    r.incomplete  # run -> why it is not in the frames (not started, running, failed, ...)

``arm`` is the run's grid point (``base`` without ``--grid``) or its arm of a design file;
``seed_<factor>`` the resolved seed of every factor. Only finished runs (done or diverged)
are in ``metrics`` and ``events`` unless ``partial=True``, which adds the complete rows of
runs still going (a torn last line of a killed run is dropped). A run whose files cannot
be read is named in ``incomplete`` with the reason, never an exception. Needs pandas (the
``analysis`` extra: ``pip install 'jaxrepro[analysis]'``).
"""

from __future__ import annotations

import dataclasses
import os

from jaxrepro import dropoff as dropoff_lib
from jaxrepro import rng
from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import jsonio

FINISHED = ("done", "diverged")
_RUN_KEYS = ("run", "arm")


class ResultsError(JaxreproError):
    """A directory that is neither a run nor a study."""


@dataclasses.dataclass
class Results:
    metrics: object  # pandas.DataFrame
    events: object
    runs: object
    incomplete: dict[str, str]


def _pandas():
    try:
        import pandas
    except ImportError as e:  # the optional extra
        raise ResultsError(
            "jaxrepro.results needs pandas: pip install 'jaxrepro[analysis]' (or pandas)"
        ) from e
    return pandas


def _study_runs(path: str) -> list[tuple[str, str]]:
    """(name, arm) of each planned run of a study, in plan order."""
    from jaxrepro.study import plan

    try:
        return plan.planned_runs(jsonio.read_json(os.path.join(path, plan.STUDY_FILE)))
    except (OSError, ValueError, KeyError, TypeError, JaxreproError) as e:
        raise ResultsError(f"{os.path.join(path, plan.STUDY_FILE)} is unreadable: {e}") from e


def load(path: str, *, partial: bool = False) -> Results:
    """Loads a study directory (or one run's workdir) into DataFrames (module docstring)."""
    pd = _pandas()
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "study.json")):
        planned = [(n, arm, os.path.join(path, "runs", n)) for n, arm in _study_runs(path)]
    elif os.path.isfile(os.path.join(path, "config.json")):
        planned = [(os.path.basename(path), "base", path)]
    else:
        raise ResultsError(f"{path} is neither a jaxrepro study (study.json) nor a run")
    metrics, events, runs, incomplete = [], [], [], {}
    for name, arm, workdir in planned:
        one = _load_run(name, arm, workdir, partial)
        if one.get("summary") is not None:
            runs.append(one["summary"])
        if one.get("why"):
            incomplete[name] = one["why"]
        metrics.extend(one.get("metrics", []))
        events.extend(one.get("events", []))
    return Results(
        metrics=_frame(pd, metrics),
        events=_frame(pd, events),
        runs=_frame(pd, runs),
        incomplete=incomplete,
    )


def _frame(pd, rows):
    frame = pd.DataFrame(rows)
    front = [c for c in _RUN_KEYS if c in frame.columns]
    front += sorted(c for c in frame.columns if c.startswith("seed_"))
    return frame[front + [c for c in frame.columns if c not in front]]


def _load_run(name: str, arm: str, workdir: str, partial: bool) -> dict:
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return {"why": "not started"}
    try:
        info = jsonio.read_json(os.path.join(workdir, "run.json"))
    except FileNotFoundError:
        return {"why": "not started (no run.json yet)"}
    except (OSError, ValueError) as e:
        return {"why": f"unreadable run.json: {e}"}
    status = info.get("status")
    keys = {"run": name, "arm": arm}
    seeds = info.get("seeds") or {}
    keys.update({f"seed_{f}": seeds.get(f) for f in rng.FACTORS if f in seeds})
    summary = dict(
        keys,
        status=status,
        step=info.get("step"),
        total_steps=info.get("total_steps"),
        wall_time_s=info.get("wall_time_s"),
        dropoff_count=info.get("dropoff_count"),
        nonfinite_steps=info.get("nonfinite_steps"),
        final_param_hash=info.get("final_param_hash"),
        error=info.get("error"),
    )
    out = {"summary": summary}
    if status not in FINISHED:
        out["why"] = f"{status}" + (f": {info['error']}" if info.get("error") else "")
        if not partial:
            return out
    try:
        rows = dropoff_lib.read_metrics(workdir)
        found = dropoff_lib.load_dropoffs(workdir)
    except (OSError, ValueError) as e:
        out["why"] = f"unreadable metrics or drop-offs: {e}"
        return out
    out["metrics"] = [dict(keys, **r) for r in rows]
    out["events"] = [dict(keys, **e) for e in found]
    return out

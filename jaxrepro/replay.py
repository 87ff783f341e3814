"""Replay a run from a checkpoint: exactly, or with one thing changed.

``replay(RUN, dropoff=0)`` restores the last checkpoint strictly before drop-off 0 into
``RUN/replays/NAME/`` (a workdir of its own; RUN's checkpoints are only read) and trains
through the event. With no overrides it reports, per step, whether the replayed metrics
equal the original bit for bit and the first step where they differ. With overrides
(``seeds.aug=7``, ``optimizer.lr=3e-4``, ``data.augment.flip.enabled=false``) or
``skip_batches`` (as in PaLM's spike recovery) it is a counterfactual: the curve is
compared with the original and the report says whether the drop-off came back.
"""

from __future__ import annotations

import os
import re

from jaxrepro import config as config_lib
from jaxrepro import dropoff as dropoff_lib
from jaxrepro import machine, trajectory
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import CheckpointError, ConfigError, WorkdirError
from jaxrepro.plumbing import jsonio
from jaxrepro.train import loop, runinfo
from jaxrepro.train.setup import Origin
from jaxrepro.workdir import Workdir

_REFUSED_PREFIXES = ("model.", "data.source.", "data.target.", "data.image_size")


def parse_overrides(config, overrides) -> list[str]:
    """Applies ``key=value`` strings to ``config``; returns them normalised."""
    out = []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not of the form key=value")
        key, value = (t.strip() for t in text.split("=", 1))
        if key.startswith(_REFUSED_PREFIXES):
            raise ConfigError(
                f"override {key!r} would change the architecture or the data of the "
                "restored state; a replay can change seeds, optimizer, augmentation, order"
            )
        config_lib.apply_override(config, key, value)
        out.append(f"{key}={value}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)[:80]


def _event(ws: Workdir, index: int) -> dict:
    events = dropoff_lib.load_dropoffs(ws.path)
    if not events:
        raise WorkdirError(f"{ws.path} has no recorded drop-offs (dropoffs.json is empty)")
    if not 0 <= index < len(events):
        raise WorkdirError(
            f"drop-off {index} does not exist in {ws.path}: it has {len(events)} "
            f"(0..{len(events) - 1}); list them with `jaxrepro dropoffs --workdir={ws.path}`"
        )
    return events[index]


def plan(run_dir: str, *, dropoff=None, from_step=None, steps=None, window=None) -> dict:
    """Which checkpoint to restore and where to stop, checked before anything is written."""
    ws = Workdir(run_dir)
    if not ws.exists():
        raise WorkdirError(f"{ws.path} is not a jaxrepro run (no config.json)")
    if (dropoff is None) == (from_step is None):
        raise ConfigError("give exactly one of --dropoff=INDEX or --from_step=STEP")
    if not os.path.isdir(ws.checkpoint_dir):
        raise CheckpointError(f"{ws.path} has no checkpoints to replay from")
    ckpts = Checkpoints(ws.checkpoint_dir, read_only=True)
    available = ckpts.steps()
    ckpts.close()
    if not available:
        raise CheckpointError(f"{ws.path} has no complete checkpoint to replay from")
    config = config_lib.from_dict(ws.stored_config())
    event = None
    if dropoff is not None:
        event = _event(ws, int(dropoff))
        before = [s for s in available if s < event["step"]]
        if not before:
            raise CheckpointError(
                f"no checkpoint before drop-off {dropoff} at step {event['step']} "
                f"(checkpoints: {available})"
            )
        start = before[-1]
        phase_cfg = config[event["phase"]]
        window = window or max(2 * (phase_cfg.eval_every or 0), 10)
        until = event["step"] + window
    else:
        at_or_before = [s for s in available if s <= int(from_step)]
        if not at_or_before:
            raise CheckpointError(
                f"no checkpoint at or before step {from_step} (checkpoints: {available})"
            )
        start, until = at_or_before[-1], None
    if steps is not None:
        until = start + int(steps)
    return {"ws": ws, "config": config, "start": start, "until": until, "event": event}


def replay(
    run_dir: str,
    *,
    dropoff: int | None = None,
    from_step: int | None = None,
    overrides=(),
    skip_batches: int = 0,
    name: str | None = None,
    steps: int | None = None,
    window: int | None = None,
    devices: int | None = None,
    setup: dict | None = None,
    force: bool = False,
    out_dir: str | None = None,
) -> dict:
    """Branches ``run_dir`` from a checkpoint and compares the branch with the original.

    ``out_dir``: the branch's directory (default ``RUN/replays/NAME``); a study puts its
    remedy arms' branches beside its other runs.

    ``devices`` runs the replay on a mesh of that many devices instead of the run's: in
    device-count-invariant mode (``determinism.device_invariant``) an exact replay is
    still bit for bit, provided the process setup is the recorded one (``jaxrepro
    replay`` re-executes itself under it; ``setup`` is what it found, for the summary).

    Before any work the run's recorded platform fingerprint is compared with this one
    (jaxrepro.machine): where they differ, bitwise equality cannot be expected and the
    replay is refused unless ``force``; the summary records the comparison.

    Returns the summary also written to ``replays/NAME/replay_summary.json`` (there with
    its paths ``run``, ``replay_dir`` and ``figure`` relative to the replay's directory).
    """
    p = plan(run_dir, dropoff=dropoff, from_step=from_step, steps=steps, window=window)
    ws, config, start = p["ws"], p["config"], p["start"]
    applied = parse_overrides(config, overrides)
    if skip_batches < 0:
        raise ConfigError(f"--skip_batches must be >= 0, got {skip_batches}")
    run_info = ws.read_run()
    current = runinfo.platform_info(portable=config.determinism.portable)
    platform_check = machine.compare_platforms(
        run_info.get("platform") or {}, current, force=force, what=f"replay of {ws.path}"
    )
    recorded_devices = (run_info.get("mesh") or {}).get("devices")
    notes = []
    if devices is not None:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ConfigError(f"--devices must be a positive device count, got {devices!r}")
        config.parallel.num_devices = devices  # the layout, not the math (see above)
        if devices != recorded_devices and not config.determinism.device_invariant:
            notes.append(
                f"the run was not in device-count-invariant mode: a replay on {devices} "
                f"devices (the run used {recorded_devices}) is not expected to be bitwise"
            )
    exact = not applied and not skip_batches
    if name is None:
        parts = [f"from{start}"] + applied + ([f"skip{skip_batches}"] if skip_batches else [])
        if devices is not None:
            parts.append(f"dev{devices}")
        name = ("exact_" if exact else "cf_") + _slug("_".join(parts))
    out = os.path.abspath(out_dir) if out_dir else os.path.join(ws.path, "replays", name)
    origin = Origin(
        checkpoint_dir=ws.checkpoint_dir,
        step=start,
        until=p["until"],
        skip_batches=int(skip_batches),
        # The run, seen from the branch: a relative path, no machine's path.
        info={
            "run": os.path.relpath(ws.path, out),
            "dropoff": dropoff,
            "overrides": applied,
            "platform_check": platform_check,
        },
        history=tuple(r for r in ws.metrics() if r["step"] < start),
        config=ws.stored_config(),
    )
    info = loop.run(config, out, origin=origin)
    # Every row of the original from the restore step to the replay's end must come back
    # (a replay that stopped early is not bit for bit); rows before it are its history.
    summary = trajectory.compare(
        ws.metrics(), Workdir(out).metrics(), start=start, until=p["until"]
    )
    replay_info = Workdir(out).read_run()
    summary.update(
        name=name,
        run=ws.path,
        replay_dir=out,
        kind="exact" if exact else "counterfactual",
        from_step=start,
        until=info.get("step"),
        overrides=applied,
        skip_batches=int(skip_batches),
        event=p["event"],
        status=info.get("status"),
        final_param_hash=info.get("final_param_hash"),
        devices={
            "recorded": recorded_devices,
            "replay": (replay_info.get("mesh") or {}).get("devices"),
        },
        setup=setup,
        notes=notes,
        platform_check=platform_check,
    )
    if p["event"] is not None:
        summary["event_recurs"] = _recurs(p["event"], dropoff_lib.load_dropoffs(out))
    summary["figure"] = _figure(ws, out, summary)
    jsonio.write_json(os.path.join(out, "replay_summary.json"), _relative_paths(summary, out))
    return summary


def _relative_paths(summary: dict, out: str) -> dict:
    """The summary as written: its paths relative to the replay's directory ``out``, so the
    file holds no absolute path of this machine and stays right when the run is moved."""
    written = dict(summary)
    for key in ("run", "replay_dir", "figure"):
        if written.get(key):
            written[key] = os.path.relpath(written[key], out)
    return written


def _recurs(event: dict, replay_events: list[dict], slack: int = 10) -> bool:
    return any(
        e["metric"] == event["metric"] and abs(e["step"] - event["step"]) <= slack
        for e in replay_events
    )


def _figure(ws: Workdir, out: str, summary: dict) -> str | None:
    from jaxrepro.report import figures

    png = os.path.join(out, "replay_overlay.png")
    event = summary.get("event") or {"step": summary["from_step"], "metric": "loss"}
    metric = "loss" if event.get("metric", "loss") == "loss" else event["metric"]
    figures.replay_overlay(
        ws.metrics(),
        Workdir(out).metrics(),
        event,
        png,
        metric=metric,
        restore_step=summary["from_step"],
    )
    return png

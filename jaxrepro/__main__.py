r"""The command line: ``jaxrepro COMMAND --flags`` (also ``python -m jaxrepro``).

    jaxrepro train    --config=configs/digits.py[:smoke] --workdir=DIR [--config.x.y=v ...]
    jaxrepro prepare  (--dataset=NAME | --config=...) [--data_dir=DIR] [--manual_dir=DIR]
    jaxrepro dropoffs --workdir=DIR [--detect [--rewrite]]
    jaxrepro diagnose --workdir=DIR [--dropoff=INDEX|all] [--arms=...] [--after=N] [--force]
    jaxrepro replay   --workdir=RUN (--dropoff=I | --from_step=S) [--override k=v ...]
                      [--skip_batches=N] [--steps=N] [--name=NAME] [--devices=N]
    jaxrepro audit    --config=... --steps=N [--out=DIR] [--devices=8 | --devices=2,8]
                      (twice straight, once SIGKILLed half way and resumed: bitwise?)
    jaxrepro study    --config=... --vary=aug --seeds=0-7 --out=DIR [--grid=k=v1,v2]
                      [--parallel=N] [--keep_checkpoints=needed|dropoffs|all]
    jaxrepro study    --design=FILE[:variant] --out=DIR [--arms=a,b] [--config=...]
    jaxrepro port     --arch=resnet50 --torch=FILE --out=DIR
    jaxrepro torch_train --config=... --workdir=DIR   (the PyTorch reference run)
    jaxrepro compare  --jax=RUN_OR_STUDY --torch=PATH --out=DIR
    jaxrepro bench    step|speed|startup|e2e|checkpoint|memory|detector|portable|diagnose|data|all
                      [key=value ...] [--out=results/bench]
    jaxrepro status   DIR [--watch [--interval=S]]   (a run or a study directory)

Errors in the user's input print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import compile_cache

COMMANDS = {}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<exp>.py[:variant]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "A run's working directory.")
flags.DEFINE_string(
    "dropoff",
    None,
    "replay: index of the drop-off to replay (jaxrepro dropoffs); diagnose: an index or 'all'.",
)
flags.DEFINE_string(
    "arms",
    None,
    "diagnose: the arms, e.g. exact,aug:4,order:2,skip,lr:0.5,clip:1.0 (the default); "
    "study: only these arms of the --design file, e.g. pad4,lr_half.",
)
flags.DEFINE_string(
    "design",
    None,
    "study: a design file FILE[:variant] (e.g. configs/studies/paper.py:quick): named arms, "
    "each its factors, seeds and config overrides; instead of --vary/--seeds/--grid.",
)
flags.DEFINE_integer(
    "after", None, "diagnose: steps after the onset each arm runs (default diagnose.after)."
)
flags.DEFINE_integer("from_step", None, "replay: replay from the checkpoint at/before this step.")
flags.DEFINE_multi_string("override", [], "replay: counterfactual change, key=value (repeatable).")
flags.DEFINE_integer("skip_batches", 0, "replay: skip this many batches of the data order.")
flags.DEFINE_string("name", None, "replay: name of the branch under RUN/replays/.")
flags.DEFINE_integer("steps", None, "replay: steps to train; audit: steps to audit.")
flags.DEFINE_string(
    "devices",
    None,
    "audit: also run on these device counts (8, or 2,8) and compare with 1; "
    "replay: the mesh size of the replay (default: the run's).",
)
flags.DEFINE_bool(
    "replay_setup",
    True,
    "replay: re-execute under the run's recorded process setup (XLA flags, simulated "
    "device count, CPU threads) when this process's differs.",
)
flags.DEFINE_bool(
    "force",
    False,
    "replay, diagnose, study: go on although a run was recorded on another platform "
    "fingerprint "
    "(recorded; bitwise equality is then not expected).",
)
flags.DEFINE_string(
    "out",
    None,
    "Output directory (audit, study, port, compare, bench; replay: the branch's directory).",
)
flags.DEFINE_string("vary", None, "study: factors to vary: aug | aug,data | all.")
flags.DEFINE_string("seeds", None, "study: seeds, e.g. 0-7 or 0,1,5.")
flags.DEFINE_integer("parallel", 1, "study: runs at once (separate processes).")
flags.DEFINE_multi_string(
    "grid",
    [],
    "study: a config field and values, e.g. "
    "data.augment.crop.padding=4,3 (repeatable: the product).",
)
flags.DEFINE_string("arch", None, "port: architecture (resnet18 ... resnet152).")
flags.DEFINE_string(
    "torch",
    None,
    "port: a torchvision-format .pt/.pth/.safetensors file; "
    "compare: a PyTorch run or results file/dir.",
)
flags.DEFINE_string("jax", None, "compare: a jaxrepro run or study directory.")
flags.DEFINE_bool("study_replay", True, "study: replay the largest drop-off exactly.")
flags.DEFINE_integer(
    "study_diagnose",
    1,
    "study: diagnose this many of the most severe drop-offs by intervention (0: none).",
)
flags.DEFINE_bool("jobs_only", False, "study: write the job list for a cluster, run nothing.")
flags.DEFINE_enum(
    "keep_checkpoints",
    "needed",
    ["needed", "dropoffs", "all"],
    "study: which checkpoints finished runs keep: needed (their last one, and those the "
    "study's replay, diagnoses and branches still need, until done), dropoffs (the last "
    "and the one before each drop-off: every drop-off stays replayable), or all.",
)
flags.DEFINE_bool("watch", False, "status: refresh until every run has ended (Ctrl-C stops).")
flags.DEFINE_float("interval", 5.0, "status --watch: seconds between refreshes.")
flags.DEFINE_bool(
    "detect",
    False,
    "dropoffs: detect from metrics.jsonl (the run's thresholds when they are this "
    "detector's, else the defaults) and say whether dropoffs.json has the same episodes.",
)
flags.DEFINE_bool("rewrite", False, "dropoffs: with --detect, replace dropoffs.json with them.")
flags.DEFINE_string("dataset", None, "prepare: dataset name.")
flags.DEFINE_string(
    "data_dir",
    None,
    "prepare: TFDS data dir (default: the config's data.data_dir, else $JAXREPRO_DATA_DIR).",
)
flags.DEFINE_string(
    "manual_dir",
    None,
    "prepare: where the files of a dataset that cannot be downloaded are "
    "(default: DATA_DIR/downloads/manual).",
)
FLAGS = flags.FLAGS
_REPLAY_SETUP: dict = {}  # what replay_process_setup found, for the replay's summary


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _require(name: str):
    value = getattr(FLAGS, name)
    if value in (None, ""):
        raise JaxreproError(f"--{name} is required")
    return value


def _config():
    if _CONFIG.value is None:
        raise JaxreproError("--config is required (e.g. --config=configs/digits.py)")
    return _CONFIG.value


@command
def cmd_train(argv):
    from jaxrepro.train import loop

    info = loop.run(_config(), _require("workdir"))
    print(f"{info['status']}: final_param_hash={info.get('final_param_hash')}")
    return 0 if info["status"] in ("done", "running") else 1


def _dropoff_index() -> int | None:
    if FLAGS.dropoff is None:
        return None
    try:
        return int(FLAGS.dropoff)
    except ValueError as e:
        raise JaxreproError(f"--dropoff={FLAGS.dropoff!r}: replay takes one index") from e


@command
def cmd_diagnose(argv):
    from jaxrepro.diagnose import arms as arms_lib
    from jaxrepro.diagnose import engine

    diags = engine.diagnose(
        _require("workdir"),
        dropoff=FLAGS.dropoff if FLAGS.dropoff is not None else "all",
        arms=FLAGS.arms or arms_lib.DEFAULT_ARMS,
        after=FLAGS.after,
        force=FLAGS.force,
    )
    for d in diags:
        e = d["event"]
        print(
            f"drop-off {d['index']} ({e['kind']} of {e['metric']} at step {e['step']}, "
            f"{e['phase']}): {d['verdict']['cause']} -- {d['verdict']['because']}; "
            f"exact arm bitwise: {d['exact_bitwise']}"
        )
    print(f"summary: {os.path.join(FLAGS.workdir, engine.DIR, 'summary.md')}")
    return 0 if all(d["exact_bitwise"] is not False for d in diags) else 1


@command
def cmd_replay(argv):
    from jaxrepro import replay

    devices = None
    if FLAGS.devices is not None:
        try:
            devices = int(FLAGS.devices)
        except ValueError as e:
            raise JaxreproError(f"--devices={FLAGS.devices!r}: a replay takes one count") from e
    s = replay.replay(
        _require("workdir"),
        dropoff=_dropoff_index(),
        from_step=FLAGS.from_step,
        overrides=FLAGS.override,
        skip_batches=FLAGS.skip_batches,
        name=FLAGS.name,
        steps=FLAGS.steps,
        devices=devices,
        setup=_REPLAY_SETUP.get("record"),
        force=FLAGS.force,
        out_dir=FLAGS.out,
    )
    from jaxrepro.workdir import shown

    _print_setup(s)
    if s["platform_check"]["differences"]:
        print("platform differs from the run's: " + "; ".join(s["platform_check"]["differences"]))
    where = shown(s["replay_dir"])
    print(f"{s['kind']} replay from step {s['from_step']} to {s['until']} -> {where}")
    if s["kind"] == "exact":
        from jaxrepro import trajectory

        first = trajectory.describe(s["first_difference"])
        verdict = "bit for bit" if s["bitwise_equal"] else f"NOT bitwise, first: {first}"
        print(
            f"{s['compared_rows']} rows compared, {len(s['missing_rows'])} missing in the "
            f"replay, {len(s['extra_rows'])} extra: {verdict}"
        )
    if "event_recurs" in s:
        print(f"the drop-off {'recurs' if s['event_recurs'] else 'does not recur'} in the replay")
    figure = shown(s["figure"]) if s["figure"] else None
    print(f"summary: {os.path.join(where, 'replay_summary.json')}  figure: {figure}")
    return 0 if s["kind"] != "exact" or s["bitwise_equal"] else 1


def _print_setup(s: dict) -> None:
    setup, dev = s.get("setup") or {}, s["devices"]
    if setup.get("reexecuted"):
        differed = "; ".join(setup["differed"])
        print(f"re-executed under the run's recorded process setup (here: {differed})")
    for d in setup.get("differences", []):
        print(f"warning: not the recorded process setup: {d}")
    for why in setup.get("not_recreated", []):
        print(f"warning: {why}")
    if dev["replay"] != dev["recorded"]:
        print(f"on {dev['replay']} device(s) (the run used {dev['recorded']})")
    for note in s.get("notes", []):
        print(f"note: {note}")


@command
def cmd_audit(argv):
    from jaxrepro import audit, trajectory

    steps = FLAGS.steps if FLAGS.steps is not None else 8
    r = audit.audit(_config(), steps, FLAGS.out, devices=_device_counts())
    sides = {
        "repeat": ("first run", "second run"),
        "kill_and_resume": ("straight run", "resumed run"),
    }
    for name, names in sides.items():
        v = r[name]
        line = "bitwise identical" if v["ok"] else "DIFFERS"
        if name == "kill_and_resume":
            line = audit.describe_kill(v)
        if v.get("killed", True) and not (v["metrics_bitwise_equal"] and v["state_bitwise_equal"]):
            first = trajectory.describe(v["first_difference"], names)
            line += f"; first difference: {first}, leaves {v['differing_leaves'][:5]}"
        print(f"{name}: {line}")
    if "devices" in r:
        _print_devices(r["devices"])
    return 0 if r["ok"] else 1


def _device_counts() -> list[int] | None:
    if FLAGS.devices is None:
        return None
    try:
        return [int(d) for d in FLAGS.devices.split(",")]
    except ValueError as e:
        raise JaxreproError(f"--devices={FLAGS.devices!r}: expected counts like 8 or 2,8") from e


def _print_devices(r: dict) -> None:
    top = r["devices"][-1]
    same = r["repeat"]["metrics_bitwise_equal"] and r["repeat"]["state_bitwise_equal"]
    print(f"{top} devices, run twice: {'bitwise identical' if same else 'DIFFERS'}")
    for d, v in r["versus_one"].items():
        worst = v["divergence"]["max"].get("loss", {})
        print(
            f"{d} devices vs 1: max |loss diff| {worst.get('abs', 0):.3g} "
            f"(relative {worst.get('rel', 0):.3g}) over {v['divergence']['compared_rows']} rows; "
            f"final params max |diff| {v['params']['max_abs']:.3g}, "
            f"relative norm {v['params']['relative_norm']:.3g}"
        )


@command
def cmd_study(argv):
    from jaxrepro import study

    config = _CONFIG.value if FLAGS.design else _config()  # a design names its own
    return study.main_from_flags(FLAGS, config)


@command
def cmd_port(argv):
    from jaxrepro.compare import torch_port

    path = _require("torch")
    if not os.path.isfile(path):
        raise JaxreproError(f"--torch={path!r}: no such file")
    state_dict = torch_port.load_torch_file(path)
    variables = torch_port.torch_to_flax(state_dict, _require("arch"))
    out = torch_port.save_flax(variables, FLAGS.arch, _require("out"), source=FLAGS.torch)
    print(
        f"ported {FLAGS.torch} ({FLAGS.arch}) -> {out}; start a run from it with "
        f"--config.init_from={out}"
    )
    return 0


@command
def cmd_torch_train(argv):
    from jaxrepro.compare import reference

    return reference.main_from_flags(FLAGS, _config())


@command
def cmd_compare(argv):
    from jaxrepro.compare import report

    return report.main_from_flags(FLAGS)


@command
def cmd_bench(argv):
    from jaxrepro import bench

    return bench.main(argv[2:], FLAGS)


@command
def cmd_prepare(argv):
    """Prepares a dataset, or both of a config's, and checks them; explains manual ones."""
    from jaxrepro import data
    from jaxrepro.errors import DataError

    if FLAGS.dataset:
        names, data_dir = [FLAGS.dataset], FLAGS.data_dir
    elif _CONFIG.value is not None:
        d = _CONFIG.value.data
        names = list(dict.fromkeys((d.source.name, d.target.name)))
        data_dir = FLAGS.data_dir or d.data_dir
    else:
        raise JaxreproError("--dataset or --config is required (e.g. --dataset=cifar10)")
    data_dir = data.resolve_data_dir(data_dir)
    failed = []
    for name in names:  # each in turn: one that needs manual files does not stop the others
        try:
            path = data.prepare(name, data_dir, manual_dir=FLAGS.manual_dir)
        except DataError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        splits = data.ensure_prepared(name, data_dir).info.splits
        counts = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(splits.items()))
        print(f"prepared {name} in {path}; checked: {counts}")
    return 2 if failed else 0


@command
def cmd_dropoffs(argv):
    from jaxrepro import dropoff
    from jaxrepro.workdir import Workdir

    ws = Workdir(_require("workdir"))
    if not ws.exists():
        raise JaxreproError(f"{ws.path} is not a jaxrepro run (no config.json)")
    if FLAGS.rewrite and not FLAGS.detect:
        raise JaxreproError("--rewrite replaces dropoffs.json with what --detect finds: give both")
    events = dropoff.load_dropoffs(ws.path)
    if FLAGS.detect:
        cfg, note = dropoff.config_for_run(ws.stored_config().get("dropoff"))
        try:
            found = dropoff.detect(dropoff.read_metrics(ws.path), cfg)
        except (ValueError, FileNotFoundError) as e:
            raise JaxreproError(str(e)) from e
        same = dropoff.same_episodes(found, events)
        print(
            f"detected from metrics.jsonl ({note}): {len(found)} episode(s), "
            + ("the same as dropoffs.json" if same else f"dropoffs.json differs ({len(events)})")
        )
        if FLAGS.rewrite and not same:
            print(f"wrote {dropoff.write_dropoffs(ws.path, found)}")
        events = found
    for i, e in enumerate(events):
        print(f"{i}: {dropoff.describe(e)}")
    if not events:
        print("no drop-offs recorded" if not FLAGS.detect else "no drop-offs detected")
    return 0


@command
def cmd_status(argv):
    from jaxrepro import status

    path = argv[2] if len(argv) > 2 else FLAGS.workdir
    if not path:
        raise JaxreproError("usage: jaxrepro status DIR [--watch]: a run or a study directory")
    if FLAGS.interval <= 0:
        raise JaxreproError(f"--interval={FLAGS.interval}: must be > 0 seconds")
    while True:
        s = status.status(path)
        text = status.format_status(s)
        if FLAGS.watch and sys.stdout.isatty():
            text = "\x1b[H\x1b[2J" + text  # redraw in place
        print(text, flush=True)
        if not FLAGS.watch or not _still_going(s):
            return 0
        try:
            time.sleep(FLAGS.interval)
        except KeyboardInterrupt:
            return 0
        if not sys.stdout.isatty():
            print(flush=True)


def _still_going(s: dict) -> bool:
    runs = s["runs"].values() if s["kind"] == "study" else [s]
    return any(r["state"] in ("running", "unknown") for r in runs)


def _setup_logging():
    """Our progress at INFO on stderr; the libraries' (orbax, tfds, absl) only errors."""
    absl_logging.set_verbosity(absl_logging.ERROR)
    logger = logging.getLogger("jaxrepro")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s jaxrepro %(levelname)s %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)


def _before_backend() -> None:
    """Deterministic GPU and portable CPU modes' XLA flags, ``jax.distributed``: before JAX."""
    from jaxrepro import machine, parallel

    settings = None  # the defaults (deterministic), unless a config says otherwise
    if _CONFIG.value is not None and "determinism" in _CONFIG.value:
        settings = _CONFIG.value.determinism.to_dict()
    elif FLAGS.workdir and os.path.isfile(os.path.join(FLAGS.workdir, "config.json")):
        from jaxrepro.plumbing import jsonio  # replay & co: the run's own setting

        settings = jsonio.read_json(os.path.join(FLAGS.workdir, "config.json")).get("determinism")
    parallel.apply_determinism(settings)
    machine.apply_portable(bool((settings or {}).get("portable", False)))
    parallel.initialize()


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        print(
            f"usage: jaxrepro {{{'|'.join(sorted(COMMANDS))}}} --flags  (got {got})",
            file=sys.stderr,
        )
        return 2
    positional = {"bench": None, "status": 1}  # commands that take arguments: how many
    if len(argv) > 2 and argv[1] in positional:
        most = positional[argv[1]]
        if most is not None and len(argv) - 2 > most:
            print(f"error: unexpected arguments {argv[2 + most :]}", file=sys.stderr)
            return 2
    elif len(argv) > 2:
        print(f"error: unexpected arguments {argv[2:]}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        if argv[1] == "replay" and FLAGS.workdir:
            from jaxrepro.train.invariant import setup as setup_lib

            _REPLAY_SETUP["record"] = setup_lib.replay_process_setup(
                FLAGS.workdir, sys.argv, reexec=FLAGS.replay_setup
            )
        if argv[1] != "status":  # status reads files only: no backend, no JAX
            _before_backend()
            compile_cache.setup()
        return COMMANDS[argv[1]](argv)
    except JaxreproError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_main():
    from jaxrepro.plumbing import procenv

    procenv.reexec_if_needed(sys.argv)  # before jax starts: malloc's huge pages
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run_main()

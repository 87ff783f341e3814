"""Small shared helpers for tests: configs at test size, and row comparisons."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np

from jaxrepro import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_dotted(config, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for k in parents:
        node = node[k]
    setattr(node, last, value)


def load(name: str, variant: str | None = None, data_dir: str | None = None, **overrides):
    """configs/<name>.py[:variant] with the test data dir and dotted overrides applied."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"), variant)
    if data_dir is not None:
        config.data.data_dir = data_dir
    for k, v in overrides.items():
        set_dotted(config, k.replace("__", "."), v)
    return config


# The digits smoke config shortened further: 8 pretrain + 6 fine-tune steps.
TINY = {
    "pretrain.steps": 8,
    "finetune.steps": 6,
    "pretrain.eval_every": 4,
    "finetune.eval_every": 3,
    "checkpoint.every": 4,
    "runtime.progress_every_s": 1e9,
}
# The same config as command-line flags (add --config.data.data_dir=...).
TINY_FLAGS = [
    "--config=configs/digits.py:smoke",
    *(f"--config.{k}={v}" for k, v in TINY.items()),
]


def tiny_digits(data_dir: str, **overrides):
    """The digits smoke config, shortened further: 8 pretrain + 6 fine-tune steps."""
    base = dict(TINY)
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    config = load("digits", "smoke", data_dir)
    for k, v in base.items():
        set_dotted(config, k, v)
    return config


def rows_equal(a: list[dict], b: list[dict]) -> bool:
    """Bitwise equality of metric rows (NaN equals NaN)."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b, strict=True):
        if ra.keys() != rb.keys():
            return False
        for k in ra:
            x, y = ra[k], rb[k]
            if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
                continue
            if x != y:
                return False
    return True


def snapshot(path: str) -> dict:
    """Every file under ``path`` (relative name -> bytes): to check nothing was written."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


# ----------------------------------------------------------------------------- event files


def _expected(rows) -> dict:
    """(tag, step) -> float32 value of every scalar a metrics.jsonl implies."""
    from jaxrepro import tbevents

    return {
        (tag, r["step"]): float(np.float32(v)) for r in rows for tag, v in tbevents.row_scalars(r)
    }


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def accumulator(workdir):
    """TensorBoard's own EventAccumulator over the run's event files, every point kept."""
    from tensorboard.backend.event_processing import event_accumulator as ea_lib

    from jaxrepro import tbevents

    acc = ea_lib.EventAccumulator(
        tbevents.tb_dir(workdir), size_guidance={ea_lib.SCALARS: 0, ea_lib.TENSORS: 0}
    )
    acc.Reload()
    return acc


def check_event_files(workdir) -> dict:
    """Both readers give exactly the scalars metrics.jsonl implies, each point once."""
    from jaxrepro import tbevents
    from jaxrepro.compare import readers
    from jaxrepro.workdir import Workdir

    rows = Workdir(workdir).metrics()
    want = _expected(rows)
    files = tbevents.event_files(workdir)
    assert files
    # The project's reader: rows of the same kind, phase, split, step and values.
    got = {}
    for r in readers.read_tensorboard(files):
        prefix = f"{r['phase']}/{r['kind']}/" + (f"{r['split']}/" if r["kind"] == "eval" else "")
        for k, v in r.items():
            if k not in ("kind", "step", "phase", "split"):
                got[(prefix + k, r["step"])] = v
    assert got.keys() == want.keys()
    assert all(_same(got[k], want[k]) for k in want)
    # TensorBoard's own accumulator (it applies the resume's purge itself): no point twice.
    acc = accumulator(workdir)
    seen = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            assert (tag, e.step) not in seen, f"{tag} step {e.step} twice"
            seen[(tag, e.step)] = e.value
    assert seen.keys() == want.keys()
    assert all(_same(seen[k], want[k]) for k in want)
    return {"acc": acc, "rows": rows}


def spawn_train(flags: list[str], workdir: str, data_dir: str, **env) -> subprocess.Popen:
    """``jaxrepro train FLAGS`` as a process of its own (stderr piped), on the CPU."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxrepro", "train", *flags, f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}"],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def spy(monkeypatch, owner, name: str) -> list[dict]:
    """Wraps ``owner.name`` so that every call's keyword arguments are recorded."""
    calls, real = [], getattr(owner, name)

    def wrapped(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, wrapped)
    return calls

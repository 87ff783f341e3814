r"""``jaxrepro bench speed``: images/s of the project's real train step, per setting.

    jaxrepro bench speed [arch=resnet50 size=224 batch=128 dtype=float32,bfloat16
                          deterministic=1,0 warmup=3 steps=20 timeout=150 tiny=0]

The train step as a run compiles it (ResNet, Adam, crop and flip augmentation, the
non-finite guard, the metrics) on one device and a synthetic batch already there, for every
``dtype`` x ``deterministic`` (deterministic GPU mode, jaxrepro.parallel) setting. Each
setting runs in a child process of its own, because deterministic mode is XLA flags, read
when the backend starts: the child's ``XLA_FLAGS`` are the parent's without the
deterministic-mode flags, plus those of its setting. A child that fails or runs past
``timeout`` seconds is recorded with its error, and the others go on. ``tiny=1`` is
resnet_tiny at 32x32, batch 8, 1 + 3 steps: the plumbing in seconds on a CPU.

Writes ``speed.json``: one row per setting (``images_per_s``, ``step_ms``, ``compile_s``,
the determinism record, the final loss and a hash of the parameters).
``launch/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from jaxrepro.bench.common import int_list, machine_info, versions

DEFAULTS = {
    "arch": "resnet50",
    "size": 224,
    "batch": 128,
    "dtype": "float32",  # comma-separated: float32, bfloat16
    "deterministic": "1",  # comma-separated 1 / 0: deterministic GPU mode on / off
    "warmup": 3,
    "steps": 20,
    "timeout": 150,  # seconds per setting
    "tiny": 0,  # 1: resnet_tiny, 32x32, batch 8, 1 warm-up and 3 timed steps
}
DTYPES = ("float32", "bfloat16")


def settings(opts: dict) -> tuple[dict, list[tuple[str, bool]]]:
    """(the options the children run with, every (dtype, deterministic) pair), checked."""
    opts = dict(opts)
    if opts["tiny"]:
        opts.update(arch="resnet_tiny", size=32, batch=8, warmup=1, steps=3)
    dtypes = [d for d in opts["dtype"].split(",") if d]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"bench option dtype={opts['dtype']!r}: expected some of {DTYPES}")
    flags = [d for d in opts["deterministic"].split(",") if d]
    if not flags or any(f not in ("0", "1") for f in flags):
        raise ValueError(
            f"bench option deterministic={opts['deterministic']!r}: expected 1, 0 or 1,0"
        )
    for key in ("size", "batch", "steps", "timeout"):
        int_list(str(opts[key]), key)  # positive
    if opts["warmup"] < 0:
        raise ValueError(f"bench option warmup={opts['warmup']}: expected >= 0")
    return opts, [(d, f == "1") for d in dtypes for f in flags]


def bench_speed(opts: dict) -> dict:
    """speed.json: every setting, each measured in its own child process."""
    opts, pairs = settings(opts)
    rows = [_child(opts, dtype, det) for dtype, det in pairs]
    return {
        "kind": "speed", "options": opts, "machine": machine_info(), "versions": versions(),
        "settings": rows,
    }  # fmt: skip


def _child(opts: dict, dtype: str, deterministic: bool) -> dict:
    from jaxrepro import parallel

    names = {f.partition("=")[0] for f in parallel.determinism_flags(None)}
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.partition("=")[0] not in names]
    env = dict(os.environ, XLA_FLAGS=" ".join(kept))
    code = (
        "import json; from jaxrepro.bench import speed; "
        f"print(json.dumps(speed.measure({opts!r}, {dtype!r}, {deterministic!r})))"
    )
    row = {"dtype": dtype, "deterministic": deterministic}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=opts["timeout"],
        )
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {opts['timeout']} s")
    if proc.returncode != 0:
        return dict(row, error=f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(opts: dict, dtype: str, deterministic: bool) -> dict:
    """In a child, before its backend starts: ``steps`` timed train steps of one setting."""
    from jaxrepro import config as config_lib
    from jaxrepro import parallel

    c = config_lib.base()
    c.model.name = opts["arch"]
    c.model.dtype = dtype
    c.data.image_size = opts["size"]
    c.data.augment.crop.enabled = True
    c.data.augment.flip.enabled = True
    c.pretrain.batch_size = opts["batch"]
    c.determinism.gpu_deterministic = deterministic
    parallel.apply_determinism(c.determinism)  # before the backend starts
    import jax

    from jaxrepro.plumbing import hashing

    step, state, inputs, compile_s, conv_impl = _compiled_step(c, opts)
    for _ in range(opts["warmup"]):
        state, m = step(state, *inputs)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(opts["steps"]):
        state, m = step(state, *inputs)
    jax.block_until_ready((state, m))
    seconds = time.perf_counter() - start
    return {
        "dtype": dtype,
        "deterministic": deterministic,
        "arch": opts["arch"],
        "size": opts["size"],
        "batch": opts["batch"],
        "determinism": parallel.determinism_record(c.determinism),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "conv_impl": conv_impl,
        "compile_s": round(compile_s, 2),
        "steps": opts["steps"],
        "step_ms": round(1000 * seconds / opts["steps"], 3),
        "images_per_s": round(opts["batch"] * opts["steps"] / seconds, 2),
        "final_loss": float(m["loss"]),
        "param_hash": hashing.tree_hash(state.params)[:16],
    }


def _compiled_step(c, opts):
    """(compiled step, state, its other inputs, compile seconds, conv impl) on one device."""
    import numpy as np

    from jaxrepro import parallel, rng
    from jaxrepro.train import setup as setup_lib
    from jaxrepro.train import state as state_lib
    from jaxrepro.train.step import make_train_step, step_controls

    size, batch, steps = opts["size"], opts["batch"], opts["warmup"] + opts["steps"]
    conv_impl = setup_lib.resolve_conv_impl(c)
    phase = state_lib.make_phase(c, "pretrain", 0, steps, 1000, conv_impl)
    params, stats = state_lib.init_variables(phase.module, rng.factor_root("init", 0), size)
    par = parallel.DataParallel(1)
    state = par.replicate(state_lib.initial_state(phase, params, stats))
    r = np.random.default_rng(0)
    images = r.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    host = {"image": images, "label": r.integers(0, 1000, batch, dtype=np.int32),
            "id": np.arange(batch, dtype=np.int32), "epoch": np.zeros(batch, np.int32)}  # fmt: skip
    keys = (rng.factor_root("aug", 0), rng.factor_root("dropout", 0), step_controls())
    inputs = (par.shard_batch(host, batch), *par.replicate(keys))
    fn = make_train_step(
        module=phase.module, tx=phase.tx, lr_fn=phase.lr_fn, phase_start=0,
        augment_cfg=c.data.augment, mean=tuple(c.data.normalize.mean),
        std=tuple(c.data.normalize.std), policy="skip",
    )  # fmt: skip
    start = time.perf_counter()
    step = par.jit_train_step(fn).lower(state, *inputs).compile()
    return step, state, inputs, time.perf_counter() - start, conv_impl


def print_speed(result: dict) -> None:
    for r in result["settings"]:
        setting = f"{r['dtype']} deterministic={int(r['deterministic'])}"
        if "error" in r:
            print(f"{setting}: failed: {r['error'][-300:]}")
        else:
            shape = f"{r['arch']} {r['size']}px batch {r['batch']}"
            print(
                f"{setting}: {r['images_per_s']} img/s, {r['step_ms']} ms a step, "
                f"compile {r['compile_s']} s ({shape})"
            )

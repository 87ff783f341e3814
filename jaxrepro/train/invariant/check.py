"""Runs the invariant step on several layouts in one process and records the bits.

Meant to run in a fresh process whose setup is the thing under test, e.g.::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m jaxrepro.train.invariant.check --layouts 1,2,4,8 --out /tmp/inv.json

For every layout (the first D devices as the mesh) it trains ``--steps`` steps of a small
ResNet from one initial state on one synthetic batch stream, and writes per step the exact
bytes (hex) of every logged metric and at the end the hashes of params, batch_stats and
opt_state. ``--plain`` also runs ``train.step.train_step`` on one device and records how
far the layout-1 result is from it (same math, other summation order). ``--npz`` saves
the first layout's final params, for comparisons across processes.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro import models, rng
from jaxrepro.data import augment as augment_lib
from jaxrepro.plumbing import hashing
from jaxrepro.train import runinfo
from jaxrepro.train.invariant import setup as setup_lib
from jaxrepro.train.invariant import step as inv_step
from jaxrepro.train.step import TrainState, make_train_step, step_controls

LOGGED = ("loss", "accuracy", "grad_norm", "update_norm", "param_norm", "lr", "finite",
          "applied", "input_mean", "input_std")  # fmt: skip


def setup(args):
    """(module, static step kwargs, initial state, list of host batches)."""
    module = models.build(
        args.model,
        10,
        stem=args.stem,
        conv_impl=args.conv_impl,
        bn_impl=args.bn_impl,
        width=getattr(args, "width", None),
    )
    x = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: module.init({"params": k}, x, train=False))(
        rng.factor_root("init", args.seed)
    )
    tx = optax.adam(args.lr)
    aug = augment_lib.default_augment_config()
    static = dict(module=module, tx=tx, lr_fn=optax.constant_schedule(args.lr), phase_start=0,
                  augment_cfg=aug, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                  policy="skip")  # fmt: skip
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        nonfinite=jnp.asarray(0, jnp.int32),
    )
    r = np.random.default_rng(args.seed)
    size, b = args.image_size, args.batch
    batches = [
        {
            "image": r.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
            "label": r.integers(0, 10, (b,)).astype(np.int32),
            "id": np.arange(s * b, (s + 1) * b, dtype=np.int32),
            "epoch": np.zeros((b,), np.int32),
        }
        for s in range(args.steps)
    ]
    return module, static, state, batches


def _hex(x) -> str:
    return np.ascontiguousarray(np.asarray(x)).tobytes().hex()


def run_steps(fn, state, batches, keys, place=None):
    """Runs the steps; returns (final state, per-step metric bytes, compile s, step s)."""
    place = place or (lambda s, b: (s, b))
    state, batch0 = place(state, batches[0])
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch0, *keys).compile()
    compile_s = time.perf_counter() - t0
    rows, times = [], []
    for batch in batches:
        _, batch = place(None, batch)
        t0 = time.perf_counter()
        state, m = compiled(state, batch, *keys)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        rows.append({k: _hex(m[k]) for k in LOGGED})
    return state, rows, compile_s, times


def _copy(state):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def layout_run(args, static, state0, batches, keys, devices: int):
    mesh = inv_step.data_mesh(devices)
    fn = inv_step.make_invariant_train_step(mesh=mesh, groups=args.groups, **static)
    rep, shard = inv_step.replicated(mesh), inv_step.batch_sharding(mesh)

    def place(state, batch):
        s = None if state is None else jax.device_put(state, rep)
        return s, jax.device_put(batch, shard)

    return run_steps(fn, _copy(state0), batches, keys, place)


def summary(state, rows, compile_s, times) -> dict:
    return {
        "params": hashing.tree_hash(state.params),
        "batch_stats": hashing.tree_hash(state.batch_stats),
        "opt_state": hashing.tree_hash(state.opt_state),
        "leaf_hashes": hashing.leaf_hashes(state.params),
        "metrics": rows,
        "compile_s": round(compile_s, 3),
        "step_s": [round(t, 4) for t in times],
    }


def rel_err(a, b) -> float:
    """Largest per-leaf relative L2 difference between two trees."""
    errs = [
        float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / max(np.linalg.norm(np.asarray(y)),
                                                                    1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]  # fmt: skip
    return max(errs)


def plain_comparison(static, state0, batches, keys, inv_state) -> dict:
    fn = make_train_step(**static)
    state, rows, compile_s, times = run_steps(fn, _copy(state0), batches, keys)
    return {
        "params_rel_err": rel_err(inv_state.params, state.params),
        "batch_stats_rel_err": rel_err(inv_state.batch_stats, state.batch_stats),
        "opt_state_rel_err": rel_err(
            [x for x in jax.tree.leaves(inv_state.opt_state) if x.ndim],
            [x for x in jax.tree.leaves(state.opt_state) if x.ndim],
        ),
        "final_loss_bytes": rows[-1]["loss"],
        "compile_s": round(compile_s, 3),
        "step_s": [round(t, 4) for t in times],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--stem", default="cifar")
    p.add_argument("--width", type=int, default=None, help="stem channels (None: the model's)")
    p.add_argument("--conv_impl", default="matmul")
    p.add_argument("--bn_impl", default="fused")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--npz", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    setup_lib.apply_env_threads()  # before the backend starts: it sizes its thread pool
    rng.configure()
    _, static, state0, batches = setup(args)
    keys = (rng.phase_root(rng.factor_root("aug", args.seed), "pretrain"),
            rng.phase_root(rng.factor_root("dropout", args.seed), "pretrain"),
            step_controls())  # fmt: skip
    result = {
        "platform": runinfo.platform_info(),
        "args": vars(args),
        "init_params": hashing.tree_hash(state0.params),
        "layouts": {},
    }
    first = None
    for d in (int(x) for x in args.layouts.split(",")):
        state, rows, compile_s, times = layout_run(args, static, state0, batches, keys, d)
        result["layouts"][str(d)] = summary(state, rows, compile_s, times)
        first = state if first is None else first
    if args.npz:
        flat = {hashing.path_str(k): np.asarray(v)
                for k, v in jax.tree_util.tree_flatten_with_path(first.params)[0]}  # fmt: skip
        np.savez(args.npz, **flat)
    if args.plain:
        result["plain"] = plain_comparison(static, state0, batches, keys, first)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

"""Cost of the invariant step, and what the process setup does to the bits.

``speed``: grouped vs plain step, on a 1-device mesh and on an 8-device mesh (plain on 8
= ``train_step`` jitted with the batch sharded over 'data' and the state replicated:
XLA's data parallelism). Compile time (wall and process CPU) and step time (median wall
and mean process-CPU seconds per step; the steps of the four variants are interleaved,
so load from other processes hits them alike). Run it in an 8-device process::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m jaxrepro.bench.invariant speed --out results/bench/invariant.json

``probe``: the same one-device invariant step in processes with another setup (forced
device count 1 vs 8, one CPU thread vs all): which parameters differ, and by how much.

``layouts``: ``check`` on meshes of 1, 2, 4 and 8 of 8 forced devices (other models and
conv paths than the tests use): whether params, batch_stats, opt_state and every metric
agree bit for bit.

Results are merged into ``--out`` under ``speed/...``, ``probe/...`` and ``layouts/...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from jaxrepro import machine, rng
from jaxrepro.plumbing import hashing
from jaxrepro.train import runinfo
from jaxrepro.train.invariant import check, setup
from jaxrepro.train.invariant import step as inv_step
from jaxrepro.train.step import make_train_step, step_controls


def _compile(fn, state, batch, keys) -> tuple:
    w0, c0 = time.perf_counter(), time.process_time()
    compiled = fn.lower(state, batch, *keys).compile()
    return compiled, time.perf_counter() - w0, time.process_time() - c0


def _variants(args, static, state0, batch, keys) -> dict:
    """name -> (compiled, state, batch, compile wall s, compile cpu s)."""
    out = {}
    for devices in (1, 8):
        if devices > jax.device_count():
            continue
        mesh = inv_step.data_mesh(devices)
        rep, shard = inv_step.replicated(mesh), inv_step.batch_sharding(mesh)
        state, placed = jax.device_put(state0, rep), jax.device_put(batch, shard)
        plain = make_train_step(**static)
        inv = inv_step.make_invariant_train_step(mesh=mesh, groups=args.groups, **static)
        for name, fn in (("plain", plain), ("grouped", inv)):
            s = jax.tree.map(lambda a: a.copy(), state)
            compiled, cw, cc = _compile(fn, s, placed, keys)
            out[f"{name}_{devices}dev"] = [compiled, s, placed, cw, cc]
    return out


def speed(args) -> dict:
    rng.configure()
    module_args = argparse.Namespace(**{**vars(args), "steps": 1, "seed": 0, "lr": 3e-3})
    _, static, state0, batches = check.setup(module_args)
    keys = (rng.factor_root("aug", 0), rng.factor_root("dropout", 0), step_controls())
    load0 = os.getloadavg()
    variants = _variants(args, static, state0, batches[0], keys)
    walls = {k: [] for k in variants}
    cpus = {k: [] for k in variants}
    for i in range(args.warmup + args.iters):
        for name, v in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            v[1], _ = v[0](v[1], v[2], *keys)
            jax.block_until_ready(v[1])
            if i >= args.warmup:
                walls[name].append(time.perf_counter() - w0)
                cpus[name].append(time.process_time() - c0)
    rows = {
        name: {
            "compile_wall_s": round(v[3], 2),
            "compile_cpu_s": round(v[4], 2),
            "step_wall_median_s": round(statistics.median(walls[name]), 4),
            "step_cpu_mean_s": round(statistics.fmean(cpus[name]), 4),
        }
        for name, v in variants.items()
    }
    # Every variant ran the same steps on the same batch from the same state.
    grouped = [hashing.tree_hash(jax.device_get(v[1])) for k, v in variants.items()
               if k.startswith("grouped")]  # fmt: skip
    ratios = {}
    for d in ("1dev", "8dev"):
        g, p = rows.get(f"grouped_{d}"), rows.get(f"plain_{d}")
        if g and p:
            ratios[d] = {k: round(g[k] / p[k], 2) for k in g}
    return {
        "config": {k: getattr(args, k) for k in ("model", "stem", "image_size", "batch", "groups",
                                                 "conv_impl", "bn_impl", "iters", "warmup")},
        "variants": rows,
        "grouped_over_plain": ratios,
        "grouped_states_bitwise_equal_across_meshes": len(set(grouped)) == 1,
        "loadavg_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "platform": machine.fingerprint(runinfo.platform_info()),
    }  # fmt: skip


def _run_check(out_dir, name, xla_count, threads, extra) -> dict:
    out = os.path.join(out_dir, f"{name}.json")
    npz = os.path.join(out_dir, f"{name}.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={xla_count}")  # fmt: skip
    env.pop(setup.THREADS_ENV, None)
    if threads:
        env[setup.THREADS_ENV] = str(threads)  # check.py applies it before JAX starts
    cmd = [sys.executable, "-m", "jaxrepro.train.invariant.check", "--layouts", "1", "--out", out,
           "--npz", npz, *extra]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return dict(np.load(npz))


def _diff(a: dict, b: dict) -> dict:
    differing = sorted(k for k in a if not np.array_equal(a[k], b[k]))
    rel = max((float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a), default=0.0)
    return {"leaves_differing": len(differing), "leaves": len(a), "max_rel_diff": rel,
            "bitwise_equal": not differing}  # fmt: skip


def probe(args) -> dict:
    extra = ["--conv_impl", args.conv_impl, "--image_size", str(args.image_size),
             "--groups", str(args.groups), "--batch", str(args.batch), "--steps", "2"]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        base = _run_check(d, "c8", 8, None, extra)
        one_dev = _run_check(d, "c1", 1, None, extra)
        one_thread = _run_check(d, "c8t1", 8, 1, extra)
    return {
        "what": "invariant step on a 1-device mesh, 2 steps; reference: process with 8 forced "
        f"devices and all {machine.cpu_threads()} CPU threads",
        "config": extra,
        "device_count_flag_1_vs_8": _diff(base, one_dev),
        "cpu_threads_1_vs_all": _diff(base, one_thread),
    }


def layouts(args) -> dict:
    """Runs ``check`` (layouts 1/2/4/8, 8 forced devices) and records whether the bits agree."""
    extra = ["--model", args.model, "--stem", args.stem, "--image_size", str(args.image_size),
             "--batch", str(args.batch), "--groups", str(args.groups), "--conv_impl",
             args.conv_impl, "--steps", str(args.steps), "--layouts", "1,2,4,8"]  # fmt: skip
    if args.width:
        extra += ["--width", str(args.width)]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "check.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
        cmd = [sys.executable, "-m", "jaxrepro.train.invariant.check", "--out", out, *extra]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        with open(out) as f:
            result = json.load(f)
    runs = result["layouts"]
    ref = runs["1"]
    return {
        "config": extra,
        "state_hashes": {d: {k: r[k][:16] for k in ("params", "batch_stats", "opt_state")}
                         for d, r in runs.items()},
        "all_bitwise_equal": all(
            all(r[k] == ref[k] for k in ("params", "batch_stats", "opt_state", "metrics"))
            for r in runs.values()
        ),
        "compile_s": {d: r["compile_s"] for d, r in runs.items()},
        "platform": machine.fingerprint(result["platform"]),
    }  # fmt: skip


def _merge(path: str, section: str, key: str, value: dict) -> None:
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault(section, {})[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("speed", "probe", "layouts"))
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--stem", default="cifar")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--conv_impl", default="matmul")
    p.add_argument("--bn_impl", default="fused")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="layouts: steps per layout")
    p.add_argument("--width", type=int, default=None, help="layouts: stem channels")
    args = p.parse_args(argv)
    if args.what == "speed":
        key = f"{args.model}_{args.stem}_{args.image_size}px_b{args.batch}_g{args.groups}"
        _merge(args.out, "speed", f"{key}_{args.conv_impl}", speed(args))
    elif args.what == "layouts":
        name = f"{args.model}_w{args.width or 'default'}_{args.stem}_{args.image_size}px"
        _merge(args.out, "layouts", f"{name}_{args.conv_impl}_{args.steps}steps", layouts(args))
    else:
        _merge(args.out, "probe", f"{args.conv_impl}_{args.image_size}px_g{args.groups}",
               probe(args))  # fmt: skip


if __name__ == "__main__":
    main()

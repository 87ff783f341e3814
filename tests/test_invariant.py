"""Device-count-invariant training: same bits on 1, 2, 4 and 8 simulated devices.

The layout tests run ``python -m jaxrepro.train.invariant.check`` in fresh processes, because
the process setup (``--xla_force_host_platform_device_count``) is part of the bits. All
three train resnet_tiny (cifar stem, BatchNorm) at 16x16, batch 16, G = 8, 'lax' convs:

* A: 8 forced devices, meshes over the first 1/2/4/8 of them: every bit equal; and the
  1-device grouped step close to the plain step. A is also "the recorded run".
* C: the 1-device step in a process with 1 forced device: another setup (measured here:
  most parameters differ at ~1e-6; with 'matmul' convs they did not).
* D: a process started from ``setup_for_replay(A's record)``: A's bits again.

The 'matmul' conv path (XLA:CPU's default in the engine) is checked by the bench
(``jaxrepro.bench.invariant speed`` records 1- vs 8-device bitwise equality), not here:
its G = 8 program takes ~1.5x longer to compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TEST_XLA_FLAGS
from helpers import REPO

from jaxrepro import models, rng
from jaxrepro.data import augment as augment_lib
from jaxrepro.models.batchnorm import batch_norm_train_plain
from jaxrepro.train.invariant import grouped_bn, grouped_model, reduce, setup
from jaxrepro.train.invariant import step as inv_step
from jaxrepro.train.step import TrainState, step_controls

_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT = 1200  # generous: the machine is shared; the runs take ~1-2 minutes


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", setup.THREADS_ENV)}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}, **extra)
    return env


def _start(out_dir, name, env, args):
    out = os.path.join(out_dir, f"{name}.json")
    cmd = [
        sys.executable,
        "-m",
        "jaxrepro.train.invariant.check",
        "--out",
        out,
        "--npz",
        os.path.join(out_dir, f"{name}.npz"),
        *args,
    ]
    # Output to a file, not a pipe: a full pipe would block a process nobody reads yet.
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=log, stderr=log)
    return name, proc, out


def _finish(started) -> dict:
    results = {}
    for name, proc, out in started:
        proc.wait(timeout=_TIMEOUT)
        with open(out.replace(".json", ".log")) as f:
            log = f.read()
        assert proc.returncode == 0, f"{name} failed:\n{log[-3000:]}"
        with open(out) as f:
            results[name] = json.load(f)
        results[name]["npz"] = dict(np.load(out.replace(".json", ".npz")))
    return results


_LAX = ["--conv_impl", "lax", "--groups", "8", "--batch", "16", "--image_size", "16"]


@pytest.fixture(scope="module", autouse=True)
def started(request, tmp_path_factory):
    """Starts A and C at the module's first test, so the small tests below overlap them."""
    if not any("runs" in item.fixturenames for item in request.session.items):
        yield None  # none of the selected tests needs the processes
        return
    d = str(tmp_path_factory.mktemp("invariant"))
    a = _start(
        d,
        "A",
        {"XLA_FLAGS": f"{_FLAG}=8 {TEST_XLA_FLAGS}"},
        [*_LAX, "--layouts", "1,2,4,8", "--steps", "3", "--plain"],
    )
    c = _start(
        d,
        "C",
        {"XLA_FLAGS": f"{_FLAG}=1 {TEST_XLA_FLAGS}"},
        [*_LAX, "--layouts", "1", "--steps", "3"],
    )
    yield d, a, c
    for _, proc, _ in (a, c):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def runs(started):
    d, a, c = started
    results = _finish([a])
    # D replays A's recorded setup (while C may still run: only the setup is under test).
    env = setup.setup_for_replay(results["A"])  # check.py applies its thread count
    replay = _start(d, "D", env, [*_LAX, "--layouts", "1", "--steps", "3"])
    results.update(_finish([c, replay]))
    return results


# ------------------------------------- in-process, small (while the processes above run)


def test_tree_sum_is_the_fixed_pairwise_order():
    parts = np.array([1e8, 1.0, -1e8, 1.0, 3.0], np.float32)
    want = np.float32((parts[0] + parts[1]) + (parts[2] + parts[3])) + parts[4]
    got = np.asarray(reduce.tree_sum(jnp.asarray(parts)))
    assert got == want
    sequential = np.float32(0.0)
    for p in parts:
        sequential = np.float32(sequential + p)
    assert got != sequential  # the order is visible in the bits, so it must be fixed
    assert np.asarray(reduce.tree_sum(jnp.ones((7, 3)))).tolist() == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="G >= 1"):
        reduce.tree_sum(jnp.zeros((0, 2)))


def test_combine_trees_equals_leafwise_tree_sums():
    r = np.random.default_rng(0)
    trees = [
        {
            "a": jnp.asarray(r.normal(size=(2, 3)), jnp.float32),
            "b": {"c": jnp.asarray(r.normal(size=(4,)), jnp.float32)},
        }
        for _ in range(5)
    ]
    got = jax.jit(lambda t: reduce.combine_trees(t, None))(trees)
    for path in (("a",), ("b", "c")):
        stacked = jnp.stack([t[path[0]] if len(path) == 1 else t["b"]["c"] for t in trees])
        leaf = got[path[0]] if len(path) == 1 else got["b"]["c"]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(reduce.tree_sum(stacked)))
    with pytest.raises(ValueError, match="one dtype"):
        reduce.combine_trees([{"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int32)}], None)


def test_grouped_batch_norm_matches_batchnorm_forward_and_backward():
    r = np.random.default_rng(1)
    xs = [jnp.asarray(r.normal(1.0, 2.0, (2, 3, 3, 4)), jnp.float32) for _ in range(3)]
    scale = jnp.asarray(r.normal(size=4), jnp.float32)
    bias = jnp.asarray(r.normal(size=4), jnp.float32)
    w = jnp.asarray(r.normal(size=(6, 3, 3, 4)), jnp.float32)
    u, v = jnp.asarray(r.normal(size=4), jnp.float32), jnp.asarray(r.normal(size=4), jnp.float32)

    def plain_loss(x, s, b):
        y, mean, var = batch_norm_train_plain(x, s, b, 1e-5)
        return jnp.sum(y * w) + jnp.sum(mean * u) + jnp.sum(var * v)

    def grouped_loss(xs, ss, bs):
        ys, mean, var = grouped_bn.grouped_batch_norm(xs, ss, bs, 1e-5, None)
        return jnp.sum(jnp.concatenate(ys) * w) + jnp.sum(mean * u) + jnp.sum(var * v)

    x = jnp.concatenate(xs)
    want = jax.jit(jax.grad(plain_loss, argnums=(0, 1, 2)))(x, scale, bias)
    got = jax.jit(jax.grad(grouped_loss, argnums=(0, 1, 2)))(xs, [scale] * 3, [bias] * 3)
    np.testing.assert_allclose(
        plain_loss(x, scale, bias), grouped_loss(xs, [scale] * 3, [bias] * 3), rtol=1e-5
    )
    np.testing.assert_allclose(jnp.concatenate(got[0]), want[0], rtol=1e-4, atol=1e-5)
    # per-group weight gradients: their sum is the whole batch's gradient
    np.testing.assert_allclose(sum(got[1]), want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(got[2]), want[2], rtol=1e-4, atol=1e-5)


def _tiny(stem="cifar", image=8):
    module = models.build("resnet_tiny", 5, stem=stem, width=4, conv_impl="lax")
    x = jnp.zeros((1, image, image, 3), jnp.float32)
    init = jax.jit(lambda k: module.init(k, x, train=False))
    return module, init(rng.factor_root("init", 0))


def test_grouped_apply_matches_the_module():
    # The imagenet stem (7x7/2 conv, max-pool) here; A covers the cifar stem in training.
    module, variables = _tiny("imagenet", 16)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3), jnp.float32)
    logits, upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    xs = [x[:2], x[2:]]
    g_logits, g_stats = jax.jit(
        lambda p, bs, xs: grouped_model.grouped_apply(module, [p] * 2, bs, xs, groups=2)
    )(variables["params"], variables["batch_stats"], xs)
    np.testing.assert_allclose(jnp.concatenate(g_logits), logits, rtol=1e-4, atol=1e-5)
    assert jax.tree.structure(g_stats) == jax.tree.structure(upd["batch_stats"])
    for a, b in zip(jax.tree.leaves(g_stats), jax.tree.leaves(upd["batch_stats"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _static(module, policy="stop"):
    tx = optax.adam(1e-3)
    return tx, dict(
        module=module,
        tx=tx,
        lr_fn=optax.constant_schedule(1e-3),
        phase_start=0,
        augment_cfg=augment_lib.default_augment_config(),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        policy=policy,
    )


def test_bad_layouts_and_inputs_are_refused():
    module = models.build("resnet_tiny", 5, stem="cifar", width=4)
    _, static = _static(module)
    with pytest.raises(ValueError, match="batch size 15 is not divisible by groups=8"):
        inv_step.check_layout(15, 8, 1)
    with pytest.raises(ValueError, match="groups=8 is not divisible by the 3 devices"):
        inv_step.check_layout(24, 8, 3)
    with pytest.raises(ValueError, match="positive int"):
        inv_step.check_layout(16, 0, 1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        inv_step.make_invariant_train_step(mesh=mesh, groups=2, **static)
    with pytest.raises(ValueError, match="supports jaxrepro.models ResNets"):
        inv_step.make_invariant_train_step(
            mesh=inv_step.data_mesh(1), groups=2, **dict(static, module=object())
        )
    with pytest.raises(ValueError, match=r"missing \['tx'\], unknown \['lr'\]"):
        kwargs = {k: v for k, v in static.items() if k != "tx"}
        inv_step.make_invariant_train_step(mesh=inv_step.data_mesh(1), groups=2, lr=1, **kwargs)
    with pytest.raises(ValueError, match="policy"):
        inv_step.make_invariant_train_step(
            mesh=inv_step.data_mesh(1), groups=2, **dict(static, policy="ignore")
        )


def test_nonfinite_policy_stop_keeps_the_last_good_state():
    module, variables = _tiny()
    tx, static = _static(module, "stop")
    mesh = inv_step.data_mesh(1)
    fn = inv_step.make_invariant_train_step(mesh=mesh, groups=2, donate=False, **static)
    params = variables["params"]
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        nonfinite=jnp.asarray(0, jnp.int32),
    )
    r = np.random.default_rng(3)
    batch = {
        "image": r.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        "label": np.array([0, 1, 99, 3], np.int32),  # 99: no such class -> NaN loss
        "id": np.arange(4, dtype=np.int32),
        "epoch": np.zeros(4, np.int32),
    }
    keys = (rng.factor_root("aug", 0), rng.factor_root("dropout", 0), step_controls())
    s1, m1 = fn(state, batch, *keys)
    assert not bool(m1["finite"]) and not bool(m1["applied"])
    s2, m2 = fn(s1, dict(batch, label=np.array([0, 1, 2, 3], np.int32)), *keys)
    assert bool(m2["finite"]) and not bool(m2["applied"])  # 'stop': no step after a bad one
    assert int(s2.nonfinite) == 2 and int(s2.step) == 2
    for a, b in zip(
        jax.tree.leaves((s2.params, s2.batch_stats, s2.opt_state)),
        jax.tree.leaves((params, variables["batch_stats"], state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_setup_for_replay_env():
    record = {
        "platform": {
            "backend": "cpu",
            "local_device_count": 8,
            "cpu_threads": 2,
            "xla_flags": f"--xla_cpu_foo=1 {_FLAG}=4",
        }
    }
    env = setup.setup_for_replay(record)
    # the recorded device count wins over a stale flag, and appears once
    assert env["XLA_FLAGS"] == f"--xla_cpu_foo=1 {_FLAG}=8"
    assert env["JAX_PLATFORMS"] == "cpu" and env[setup.THREADS_ENV] == "2"
    assert setup.differences(record, env) == []
    other = dict(env, XLA_FLAGS=f"{_FLAG}=1")
    assert any(d.startswith("XLA_FLAGS") for d in setup.differences(record, other))
    assert setup.with_device_count("", 2) == f"{_FLAG}=2"
    with pytest.raises(ValueError, match="platform"):
        setup.setup_for_replay({"status": "done"})
    with pytest.raises(ValueError, match="CPUs are available"):
        setup.apply_cpu_threads(len(os.sched_getaffinity(0)) + 1)


def test_apply_env_threads_sets_the_cpu_affinity():
    code = (
        "import os; from jaxrepro.train.invariant import setup; setup.apply_env_threads(); "
        "print(len(os.sched_getaffinity(0)))"
    )
    env = _env({setup.THREADS_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


# ------------------------------------- the processes


def _same_bits(a: dict, b: dict) -> list[str]:
    """Names of the state parts and metrics whose bits differ between two layout records."""
    diff = [k for k in ("params", "batch_stats", "opt_state") if a[k] != b[k]]
    for step, (ra, rb) in enumerate(zip(a["metrics"], b["metrics"], strict=True)):
        diff += [f"step {step} {k}" for k in ra if ra[k] != rb[k]]
    return diff


def test_layouts_1_2_4_8_are_bitwise_identical(runs):
    layouts = runs["A"]["layouts"]
    assert sorted(layouts, key=int) == ["1", "2", "4", "8"]
    assert runs["A"]["platform"]["device_count"] == 8
    for d in ("2", "4", "8"):
        assert _same_bits(layouts["1"], layouts[d]) == [], d
    # every logged metric is recorded for every step, and training did something
    assert len(layouts["1"]["metrics"]) == 3
    assert set(layouts["1"]["metrics"][0]) >= {
        "loss",
        "accuracy",
        "grad_norm",
        "update_norm",
        "param_norm",
        "input_mean",
        "input_std",
    }
    assert layouts["1"]["params"] != runs["A"]["init_params"]
    losses = [
        np.frombuffer(bytes.fromhex(m["loss"]), np.float32)[0] for m in layouts["1"]["metrics"]
    ]
    assert np.all(np.isfinite(losses))


def test_one_device_grouped_step_agrees_with_plain_step(runs):
    plain = runs["A"]["plain"]
    # Same math, another summation order: a float32 rounding-level difference after 3 steps.
    assert plain["params_rel_err"] < 1e-4
    assert plain["batch_stats_rel_err"] < 1e-4
    assert plain["opt_state_rel_err"] < 1e-3


def _floats(hex_bytes: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_bytes), np.float32).astype(np.float64)


# Step 0 of A and C computes the same function of the same bits (initial state, batch,
# keys); only the order of float32 sums may differ (the compiled program depends on the
# device-count flag). A sum of n float32 terms carries a relative rounding error of at
# most (n - 1) * u (u = 2**-24) for terms of one sign; errors of the layers a value passes
# through add up. Here the longest sums are over batch x height x width = 16 * 16 * 16
# values (BatchNorm statistics and their backward, weight gradients, input statistics) and
# a value passes through at most ~2 x 11 of them (forward and backward of 11 conv/BN/fc
# layers): a relative difference up to 22 * 4096 * u ~ 5e-3 is float32 rounding of this
# size, whatever the CPU's instruction set. A real bug is O(1): a lost group (1/8 of the
# batch), a sign error, a term missing from the loss. Parameters after 3 Adam steps are
# not bounded this way: Adam divides by the gradient's own scale, so an element whose
# gradient is ~0 can move by ~lr on rounding alone (one CPU measured 8.8e-5 relative, one
# 1e-6); hence the check is on the step-0 values.
_ROUNDING_REL = 22 * 4096 * 2.0**-24


def test_device_count_flag_is_part_of_the_process_setup(runs):
    rec, other = runs["A"], runs["C"]
    assert rec["platform"]["device_count"] == 8 and other["platform"]["device_count"] == 1
    assert setup.differences(rec, setup.setup_for_replay(other)) != []
    a, b = rec["npz"], other["npz"]  # params after 3 steps on a 1-device mesh
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    print(f"device-count flag 8 vs 1: {len(differing)}/{len(a)} parameter arrays differ")
    # Whether the bits differ at all depends on the CPU and the conv impl ('matmul' gave
    # equal bits): not asserted. How much they may differ is.
    m_a, m_b = rec["layouts"]["1"]["metrics"][0], other["layouts"]["1"]["metrics"][0]
    for key in ("loss", "grad_norm", "input_mean", "input_std"):
        x, y = _floats(m_a[key]), _floats(m_b[key])
        rel = np.max(np.abs(x - y) / np.abs(x))
        print(f"step 0 {key}: relative difference {rel:.2e}")
        assert np.all(np.isfinite(x)) and np.all(np.abs(x) > 0), key
        assert rel <= _ROUNDING_REL, (key, rel)


def test_setup_for_replay_recreates_the_recorded_bits(runs):
    rec, replay = runs["A"], runs["D"]
    assert setup.differences(rec, setup.setup_for_replay(replay)) == []
    assert replay["platform"]["cpu_threads"] == rec["platform"]["cpu_threads"]
    assert _same_bits(rec["layouts"]["1"], replay["layouts"]["1"]) == []


def test_engine_runs_in_device_invariant_mode(data_dir, tmp_path, monkeypatch):
    """The loop's hook: config.determinism.device_invariant switches to the grouped step."""
    from helpers import tiny_digits

    from jaxrepro.errors import ConfigError
    from jaxrepro.train import invariant, loop

    built = []  # (groups, phase_start) of every invariant step the loop builds
    make = invariant.make_invariant_train_step

    def spy(**kw):
        built.append((kw["groups"], kw["phase_start"]))
        return make(**kw)

    monkeypatch.setattr(invariant, "make_invariant_train_step", spy)
    over = {"pretrain.steps": 3, "finetune.steps": 2, "checkpoint.every": 2}
    plain = loop.run(tiny_digits(data_dir, **over), str(tmp_path / "plain"))
    assert built == []  # the plain run never builds the grouped step
    inv_cfg = tiny_digits(data_dir, **over, **{"determinism.device_invariant": True})
    inv = loop.run(inv_cfg, str(tmp_path / "inv"))
    assert built == [(8, 0), (8, 3)]  # one grouped step a phase, G = 8
    assert inv["status"] == "done" and inv["init_param_hash"] == plain["init_param_hash"]
    rows = {
        name: [
            r["loss"] for r in loop.Workdir(str(tmp_path / name)).metrics() if r["kind"] == "train"
        ]
        for name in ("plain", "inv")
    }
    assert len(rows["inv"]) == 5
    assert np.allclose(rows["inv"], rows["plain"], rtol=1e-3)  # same math, other sum order
    # ...and another program: the grouped sums' order shows in the bits
    assert rows["inv"] != rows["plain"]
    assert inv["final_param_hash"] != plain["final_param_hash"]
    bad = tiny_digits(
        data_dir, **over, **{"determinism.device_invariant": True, "determinism.groups": 3}
    )
    with pytest.raises(ConfigError, match="determinism.groups"):
        loop.run(bad, str(tmp_path / "bad"))


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_overhead_bench_speed_runs_and_records_bitwise_meshes(tmp_path):
    """`python -m jaxrepro.bench.invariant speed` at the smallest size: the JSON it merges."""
    out = str(tmp_path / "invariant.json")
    size = ["--batch", "8", "--image_size", "8", "--iters", "1", "--warmup", "1"]
    cmd = [sys.executable, "-m", "jaxrepro.bench.invariant", "speed", "--out", out, *size]
    r = subprocess.run(
        cmd, cwd=REPO, env=_env({"XLA_FLAGS": f"{_FLAG}=8"}), capture_output=True, text=True,
        timeout=_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        (entry,) = json.load(f)["speed"].values()
    assert entry["grouped_states_bitwise_equal_across_meshes"] is True
    assert set(entry["variants"]) == {"plain_1dev", "grouped_1dev", "plain_8dev", "grouped_8dev"}
    for v in entry["variants"].values():
        assert v["step_wall_median_s"] > 0 and v["compile_wall_s"] > 0
    one = entry["grouped_over_plain"]["1dev"]["step_wall_median_s"]
    assert one == pytest.approx(
        entry["variants"]["grouped_1dev"]["step_wall_median_s"]
        / entry["variants"]["plain_1dev"]["step_wall_median_s"],
        abs=0.006,  # the JSON rounds ratios to 2 decimals
    )

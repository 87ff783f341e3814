"""Beyond one device: host slices, the mesh, multi-host over gloo, deterministic GPU mode.

The expensive part is one module fixture that, all at once, trains the same 4-step run
(a) in this process on 1 device, (b) in a child process with 8 simulated CPU devices on
meshes of 8 (twice) and 2 devices, and (c) in two processes over gloo on 127.0.0.1 with one
device each. The deterministic max-pool's gradient is checked bit for bit against jax's in
tests/test_models.py (test_deterministic_maxpool_is_bitwise_lax and neighbours).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from helpers import REPO, tiny_digits
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrepro import audit, parallel
from jaxrepro import config as config_lib
from jaxrepro.errors import ConfigError
from jaxrepro.plumbing import jsonio
from jaxrepro.workdir import Workdir

STEPS = 4
# Measured on this machine (4 steps of the tiny ResNet, 1 vs 8 devices): loss 1.6e-5
# relative, grad_norm 7e-4 relative, final params 1.1e-4 relative norm. Bounds: ~10x.
LOSS_REL_TOL = 2e-4
GRAD_NORM_REL_TOL = 1e-2
PARAMS_REL_TOL = 2e-3


# ----------------------------------------------------------------------------- host slices


@settings(max_examples=200, deadline=None)
@given(
    process_count=st.integers(1, 16),
    local_devices=st.integers(1, 8),
    per_device=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_host_slices_cover_every_example_once(process_count, local_devices, per_device, seed):
    size = process_count * local_devices * per_device
    global_ids = np.random.default_rng(seed).permutation(10 * size)[:size]
    slices = [
        parallel.host_slice(global_ids, p, process_count, local_devices)
        for p in range(process_count)
    ]
    # Every example of the global batch exactly once, in batch order, equal shares.
    np.testing.assert_array_equal(np.concatenate(slices), global_ids)
    assert {len(s) for s in slices} == {size // process_count}
    for p, s in enumerate(slices):
        start, stop = parallel.host_bounds(size, p, process_count)
        np.testing.assert_array_equal(s, global_ids[start:stop])


def test_host_slice_refuses_what_does_not_split():
    with pytest.raises(ValueError, match="does not split over 3 hosts"):
        parallel.host_slice(np.arange(8), 0, 3)
    with pytest.raises(ValueError, match="2 hosts x 4 devices"):
        parallel.host_slice(np.arange(12), 0, 2, local_device_count=4)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        parallel.host_slice(np.arange(8), 2, 2)
    with pytest.raises(ValueError, match="1-D"):
        parallel.host_slice(np.zeros((2, 2)), 0, 1)


# ----------------------------------------------------------------------------- the mesh


def test_one_device_mesh_shards_and_replicates():
    par = parallel.DataParallel()
    assert par.num_devices == 1 and par.describe()["devices"] == 1
    assert par.round_up(13) == 13
    batch = par.shard_batch({"x": np.arange(6.0).reshape(3, 2)}, 3)
    assert batch["x"].sharding == par.batch
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(6.0).reshape(3, 2))
    tree = par.replicate({"w": np.ones(2), "k": jax.random.key(0)})
    assert tree["w"].sharding == par.replicated and tree["k"].sharding == par.replicated
    with pytest.raises(ConfigError, match="parallel.num_devices: 3 is not in"):
        parallel.DataParallel(3)


def test_config_validates_the_new_sections(data_dir):
    for field, value, message in [
        ("determinism.gpu_autotune_level", 7, "is not in"),
        ("determinism.gpu_autotune_level", -1, "is not in"),
        ("parallel.num_devices", 0, "must be > 0"),
    ]:
        config = tiny_digits(data_dir)
        *parents, last = field.split(".")
        with config.unlocked():
            setattr(config[parents[0]], last, value)
        with pytest.raises(ConfigError, match=f"{field}.*{message}"):
            config_lib.validate(config)


# ----------------------------------------------------------------------------- launch env


def test_distributed_settings_from_the_environment():
    explicit = {
        "JAXREPRO_COORDINATOR": "127.0.0.1:1234",
        "JAXREPRO_NUM_PROCESSES": "2",
        "JAXREPRO_PROCESS_ID": "1",
    }
    assert parallel.distributed_settings(explicit) == {
        "coordinator_address": "127.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert parallel.distributed_settings({}) is None
    assert parallel.distributed_settings({"SLURM_STEP_NUM_TASKS": "4"}) == {}  # JAX detects
    assert parallel.distributed_settings({"SLURM_STEP_NUM_TASKS": "1"}) is None  # array task
    assert parallel.distributed_settings({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
    assert parallel.distributed_settings({"TPU_WORKER_HOSTNAMES": "a"}) is None
    off = dict(explicit, JAXREPRO_DISTRIBUTED="off")
    assert parallel.distributed_settings(off) is None
    assert parallel.distributed_settings({"JAXREPRO_DISTRIBUTED": "auto"}) == {}
    with pytest.raises(parallel.LaunchError, match="JAXREPRO_NUM_PROCESSES must be set"):
        parallel.distributed_settings({"JAXREPRO_COORDINATOR": "h:1"})
    with pytest.raises(parallel.LaunchError, match="JAXREPRO_PROCESS_ID=2 is not in"):
        parallel.distributed_settings(dict(explicit, JAXREPRO_PROCESS_ID="2"))
    with pytest.raises(parallel.LaunchError, match="expected 'off' or 'auto'"):
        parallel.distributed_settings({"JAXREPRO_DISTRIBUTED": "maybe"})


def test_deterministic_gpu_flags_go_into_xla_flags_before_the_backend():
    gpu = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    added = parallel.apply_determinism(None, gpu)  # defaults: deterministic ops, no autotuning
    assert added == ["--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0"]
    assert gpu["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", *added]
    assert parallel.apply_determinism(None, gpu) == []  # already there: nothing twice
    mine = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_autotune_level=4"}
    assert parallel.apply_determinism(None, mine) == ["--xla_gpu_deterministic_ops=true"]
    assert "--xla_gpu_autotune_level=4" in mine["XLA_FLAGS"]  # the user's setting wins
    off = {"JAX_PLATFORMS": "cuda"}
    assert parallel.apply_determinism({"gpu_deterministic": False}, off) == []
    assert "XLA_FLAGS" not in off
    keep_autotune = {"gpu_deterministic": True, "gpu_autotune_level": None}
    assert parallel.determinism_flags(keep_autotune) == ["--xla_gpu_deterministic_ops=true"]
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert parallel.apply_determinism(None, cpu) == [] and "XLA_FLAGS" not in cpu


def test_determinism_after_the_backend_started_only_warns(monkeypatch, caplog):
    jax.devices()  # the backend is up: too late for XLA flags
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert parallel.apply_determinism(None) == []
    assert os.environ["XLA_FLAGS"] == ""
    assert "the backend has started" in caplog.text


def test_divergence_is_measured_per_step():
    a = [
        {"kind": "train", "step": 0, "phase": "pretrain", "loss": 2.0, "accuracy": 0.5},
        {"kind": "train", "step": 1, "phase": "pretrain", "loss": 1.0, "accuracy": 0.5},
    ]
    b = [dict(a[0]), dict(a[1], loss=1.5)]
    d = audit.divergence(a, b)
    assert d["compared_rows"] == 2
    assert d["first_difference"] == {"kind": "train", "step": 1, "metric": "loss"}
    assert d["max"]["loss"] == {"abs": 0.5, "rel": 0.5 / 1.5}
    assert d["steps"][0]["loss"] == {"abs": 0.0, "rel": 0.0}
    with pytest.raises(ConfigError, match="device counts >= 2"):
        audit.compare_devices(None, 1, [1])


# ----------------------------------------------------------------------------- real runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_gloo_pair(config, root) -> tuple[str, list]:
    """Two ``jaxrepro train`` processes on 127.0.0.1, one CPU device each, one workdir."""
    path = os.path.join(root, "config.json")
    jsonio.write_json(path, config_lib.to_dict(config))
    with open(os.path.join(root, "config.py"), "w") as f:
        f.write(
            "from jaxrepro import config as c\nfrom jaxrepro.plumbing import jsonio\n"
            f"def get_config():\n    return c.from_dict(jsonio.read_json({path!r}))\n"
        )
    workdir, port = os.path.join(root, "gloo"), _free_port()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=" ".join(flags),
            JAXREPRO_COORDINATOR=f"127.0.0.1:{port}",
            JAXREPRO_NUM_PROCESSES="2",
            JAXREPRO_PROCESS_ID=str(pid),
            # its own cache: the second compile of the init program (run.json's hash) is a hit
            JAXREPRO_COMPILE_CACHE_DIR=os.path.join(root, f"xla_{pid}"),
        )
        cmd = [sys.executable, "-m", "jaxrepro", "train"]
        cmd += [f"--config={root}/config.py", f"--workdir={workdir}"]
        log = open(os.path.join(root, f"gloo_{pid}.log"), "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log), log))
    return workdir, procs


def _finish(procs, timeout=600) -> list[str]:
    outputs = []
    for proc, log in procs:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        with open(log.name) as f:
            outputs.append(f.read())
        assert code == 0, outputs[-1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """1 device here, 8 (twice) and 2 in a child, 2 hosts over gloo: all at once."""
    root = str(tmp_path_factory.mktemp("parallel"))
    # 'lax' convolutions compile faster than the CPU default 'matmul' (compiling dominates)
    config = tiny_digits(data_dir, pretrain__eval_every=0, model__conv_impl="lax")
    config = audit.shorten(config, STEPS)
    gloo_dir, gloo = _start_gloo_pair(config, root)
    try:
        report = audit.compare_devices(config, STEPS, [2, 8], workdir=root)
    finally:
        outputs = _finish(gloo)
    return types.SimpleNamespace(root=root, report=report, gloo_dir=gloo_dir, gloo_out=outputs)


def test_eight_devices_repeat_bitwise_and_stay_close_to_one(runs):
    r = runs.report
    assert r["repeat"]["metrics_bitwise_equal"] and r["repeat"]["state_bitwise_equal"]
    eight = r["versus_one"]["8"]
    assert eight["mesh"] == 8
    d = eight["divergence"]
    assert d["compared_rows"] == STEPS + 4  # train rows + 2 eval splits at start and end
    assert d["max"]["loss"]["rel"] < LOSS_REL_TOL, d["max"]
    assert d["max"]["grad_norm"]["rel"] < GRAD_NORM_REL_TOL, d["max"]
    assert d["max"]["accuracy"]["abs"] <= 0.01, d["max"]
    assert eight["params"]["arrays"] > 10
    assert eight["params"]["relative_norm"] < PARAMS_REL_TOL, eight["params"]
    info = Workdir(os.path.join(runs.root, "d8")).read_run()
    assert info["platform"]["device_count"] == 8 and info["mesh"]["devices"] == 8
    assert Workdir(os.path.join(runs.root, "d1")).read_run()["mesh"]["devices"] == 1
    # On CPU, deterministic GPU mode is recorded and (rightly) not in force.
    assert info["determinism"]["backend"] == "cpu" and info["determinism"]["active"] is False
    assert info["determinism"]["flags"][0] == "--xla_gpu_deterministic_ops=true"


def test_two_hosts_over_gloo_agree_and_match_one_process_with_two_devices(runs):
    hashes = [
        line.split("final_param_hash=")[1].strip()
        for out in runs.gloo_out
        for line in out.splitlines()
        if line.startswith("done: final_param_hash=")
    ]
    info = Workdir(runs.gloo_dir).read_run()
    assert len(hashes) == 2 and hashes[0] == hashes[1] == info["final_param_hash"]
    assert info["platform"]["process_count"] == 2 and info["platform"]["device_count"] == 2
    assert info["mesh"]["local_devices"] == 1
    rows = Workdir(runs.gloo_dir).metrics()  # process 0 alone wrote them: each row once
    keys = [(r["kind"], r["step"], r.get("split")) for r in rows]
    assert len(keys) == len(set(keys)) == STEPS + 4
    two = os.path.join(runs.root, "d2")
    d = audit.divergence(Workdir(two).metrics(), rows)
    assert d["compared_rows"] == STEPS + 4
    assert d["max"]["loss"]["rel"] < LOSS_REL_TOL, d["max"]
    params = audit.array_divergence(audit.final_arrays(two), audit.final_arrays(runs.gloo_dir))
    assert params["relative_norm"] < PARAMS_REL_TOL, params


# ----------------------------------------------------------------------------- launch/


def _launch(name: str) -> str:
    return os.path.join(REPO, "launch", name)


def test_local_sweep_runs_jobs_n_at_a_time_and_reports_failures(tmp_path):
    jobs = tmp_path / "jobs.txt"
    lines = [f"echo {i} > {tmp_path}/out_{i}.txt" for i in range(5)]
    jobs.write_text("# a comment\n\n" + "\n".join([*lines, "exit 3"]) + "\n")
    r = subprocess.run(
        ["bash", _launch("local_sweep.sh"), str(jobs), "2"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "FAILED (3): exit 3" in r.stderr
    assert "6 jobs" in r.stdout
    assert sorted(p.read_text() for p in tmp_path.glob("out_*.txt")) == [f"{i}\n" for i in range(5)]
    jobs.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["bash", _launch("local_sweep.sh"), str(jobs), "3"], capture_output=True)
    assert r.returncode == 0
    bad = subprocess.run(["bash", _launch("local_sweep.sh"), str(jobs), "0"], capture_output=True)
    assert bad.returncode == 2 and b"positive integer" in bad.stderr


_RUN = """\
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(*_):
    time.sleep(0.5)  # "saving a checkpoint"
    out.joinpath("saved").write_text("ok")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
out.joinpath("started").write_text("ok")
time.sleep(60)
"""


def test_slurm_array_task_checkpoints_and_requeues_on_sigterm(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (fake / "scontrol").chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    (tmp_path / "run.py").write_text(_RUN)
    jobs.write_text(f"true\n{sys.executable} {tmp_path}/run.py {tmp_path}\n")
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        JOBS=str(jobs),
        SLURM_JOB_ID="4242",
        HOME=str(tmp_path),
    )
    script = _launch("slurm_array.sbatch")
    done = subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID="1"))
    assert done.returncode == 0 and not (tmp_path / "scontrol.log").exists()
    missing = subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID="3"))
    assert missing.returncode == 1
    proc = subprocess.Popen(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID="2"))
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(15)  # what --signal=B:TERM@120 sends to the batch script
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "saved").read_text() == "ok"  # the run finished its save first
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_launch_scripts_parse_and_dry_run(tmp_path):
    for name in os.listdir(os.path.join(REPO, "launch")):
        if name.endswith((".sh", ".sbatch")):
            assert subprocess.run(["bash", "-n", _launch(name)]).returncode == 0, name
    env = dict(os.environ, TPU="v4-32", ZONE="us-central2-b", DRY_RUN="1")
    tpu = subprocess.run(
        ["bash", _launch("tpu_multihost.sh"), "configs/imagenet.py", "/mnt/runs/x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert tpu.returncode == 0
    assert "--worker=all" in tpu.stdout and "JAXREPRO_DISTRIBUTED=auto" in tpu.stdout
    gpu = subprocess.run(
        ["bash", _launch("gpu_check.sh"), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert gpu.returncode == 0
    assert gpu.stdout.count("-m jaxrepro train --config=configs/digits.py:smoke") == 2
    (speed,) = [line for line in gpu.stdout.splitlines() if "-m jaxrepro bench speed" in line]
    assert "dtype=float32,bfloat16 deterministic=1,0" in speed and "batch=128" in speed

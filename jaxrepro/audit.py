"""Audit a config's determinism: N steps twice, and once SIGKILLed half way and resumed.

Reports bitwise agreement of every metric row and every array of the final state, and
where they differ, the first differing row and the differing leaves. The killed run is a
training process of its own (``python -m jaxrepro.audit CONFIG_JSON WORKDIR``, under this
process's setup: the same XLA flags and CPU threads, checked in its run.json), killed with
SIGKILL once it has written a checkpoint half way or later, then resumed to the end in its
workdir; the report says after which checkpoint it was killed.

With ``devices=D`` it also runs the config on D devices (twice) and on 1 device, each in a
process of its own (on CPU: ``--xla_force_host_platform_device_count``), and reports whether
the D-device run repeats bit for bit, and how far it is from the 1-device run, step by step
(reductions over the batch are summed in another order, so bitwise equality is not
expected; the difference is measured, not hidden).

    python -m jaxrepro audit --config=configs/digits.py:smoke --steps=8 --devices=8
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import machine, trajectory
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import ConfigError, JaxreproError
from jaxrepro.plumbing import jsonio, sigkill
from jaxrepro.train import loop
from jaxrepro.train import setup as setup_lib
from jaxrepro.workdir import Workdir


def shorten(config, steps: int):
    """The same config cut to ``steps`` global steps (pretrain first, then fine-tune)."""
    if steps <= 0:
        raise ConfigError(f"--steps must be > 0, got {steps}")
    config = config.copy_and_resolve_references()
    data = setup_lib.load_data(config)
    pre = setup_lib.phase_steps(config, "pretrain", len(data.source_train))
    with config.unlocked():
        config.pretrain.epochs = None
        config.finetune.epochs = None
        config.pretrain.steps = min(steps, pre)
        config.finetune.steps = max(0, steps - pre)
        config.checkpoint.every = max(1, steps // 4)
    return config


def _final_manifest(path: str) -> dict:
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), read_only=True)
    try:
        return ckpts.meta(ckpts.latest_step())["manifest"]
    finally:
        ckpts.close()


def _versus(a: str, b: str) -> dict:
    rows = trajectory.compare(Workdir(a).metrics(), Workdir(b).metrics(), start=0)
    ma, mb = _final_manifest(a), _final_manifest(b)
    leaves = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    ia, ib = Workdir(a).read_run(), Workdir(b).read_run()
    out = {
        "metrics_bitwise_equal": rows["bitwise_equal"],
        "first_difference": rows["first_difference"],
        "missing_rows": rows["missing_rows"],
        "extra_rows": rows["extra_rows"],
        "state_bitwise_equal": not leaves and ia["final_state_hash"] == ib["final_state_hash"],
        "differing_leaves": leaves[:20],
        "differing_leaf_count": len(leaves),
    }
    out["ok"] = out["metrics_bitwise_equal"] and out["state_bitwise_equal"]
    return out


def audit(
    config, steps: int, out: str | None = None, devices=None, *, timeout: float = 1800
) -> dict:
    """Runs the audit in a scratch dir; writes ``audit.json`` into ``out`` if given.

    Two straight runs in this process (``repeat``), and a third as a training process of
    its own, SIGKILLed past a checkpoint half way and resumed to the end in its workdir
    (``kill_and_resume``). ``devices``: also compare D devices with 1
    (``compare_devices``); its D-device repeat must be bitwise for ``ok``, its divergence
    from 1 device is reported. ``timeout``: seconds the other processes may take.
    """
    config = shorten(config, steps)
    scratch = tempfile.mkdtemp(prefix="jaxrepro-audit-")
    try:
        a, b, c = (os.path.join(scratch, n) for n in ("straight1", "straight2", "killed"))
        loop.run(config, a)
        loop.run(config, b)
        report = {
            "steps": steps,
            "platform": Workdir(a).read_run()["platform"],
            "repeat": _versus(a, b),
            "kill_and_resume": kill_and_resume(config, a, c, scratch, timeout=timeout),
        }
        checks = [report["repeat"], report["kill_and_resume"]]
        if devices is not None:
            report["devices"] = compare_devices(config, steps, devices, timeout=timeout)
            checks.append(report["devices"]["repeat"])
        report["ok"] = all(r["ok"] for r in checks)  # a kill that did not happen is not ok
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if out:
        os.makedirs(out, exist_ok=True)
        jsonio.write_json(os.path.join(out, "audit.json"), report)
    return report


# ----------------------------------------------------------------------------- kill -9, resume


def _same_setup_env() -> dict:
    """This process's environment for a child that must compute the same bits.

    XLA flags, JAX_PLATFORMS and the CPU affinity (XLA:CPU's thread count) are inherited
    as they are; the child reuses this process's compile cache.
    """
    env = dict(os.environ)
    cache = jax.config.jax_compilation_cache_dir
    if cache and "JAXREPRO_COMPILE_CACHE_DIR" not in env:
        env["JAXREPRO_COMPILE_CACHE_DIR"] = cache
    return env


def check_same_setup(straight: str, other: str) -> None:
    """Refuses (JaxreproError) to compare run ``other`` with run ``straight`` when their
    run.json platform fingerprints differ (``machine.fingerprint``: backend, devices,
    processes, CPU threads, XLA flags, the CPU)."""
    a = machine.fingerprint(Workdir(straight).read_run().get("platform") or {})
    b = machine.fingerprint(Workdir(other).read_run().get("platform") or {})
    differ = machine.differences(a, b)
    if differ:
        raise JaxreproError(
            "kill_and_resume: the training process ran under another process setup than "
            f"the straight runs ({'; '.join(differ)}): its bits are not comparable with "
            "theirs. Run the audit where its child processes inherit the same XLA_FLAGS, "
            "backend and CPU threads."
        )


def _last_train_step(workdir: str) -> int | None:
    steps = [r["step"] for r in Workdir(workdir).metrics() if r["kind"] == "train"]
    return max(steps, default=None)


def kill_and_resume(config, straight: str, workdir: str, scratch: str, *, timeout=1800) -> dict:
    """Trains ``config`` in a process of its own, ``kill -9``s it once it has a checkpoint
    half way or later (before the end), resumes the run in ``workdir`` to the end here and
    compares it bitwise with the straight run in ``straight``.

    The straight run and this process compute the bits the killed one is compared with,
    so that process must run under the same setup: its run.json's platform record is
    checked against the straight run's (``check_same_setup``: JaxreproError when they
    differ).

    Returns ``_versus``'s verdict with ``killed`` (True: the process died of SIGKILL),
    ``signal``, ``killed_after_checkpoint`` (its last complete checkpoint then: where the
    resume starts), ``last_logged_step`` (its last train row on disk then),
    ``resumed_from`` and ``process``. A process that finished before the kill point gives
    ``killed`` False and ``ok`` False: nothing was killed, nothing resumed.
    """
    total = Workdir(straight).read_run()["total_steps"]
    half = total // 2
    ckpt_dir = Workdir(workdir).checkpoint_dir
    config_path = os.path.join(scratch, "killed_config.json")
    jsonio.write_json(config_path, config_lib.to_dict(config))
    cmd = [sys.executable, "-m", "jaxrepro.audit", config_path, workdir]
    log_path = os.path.join(scratch, "killed_log.txt")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_same_setup_env(), stdout=log, stderr=log)

    def past_half() -> bool:
        return any(half <= s < total for s in sigkill.complete_checkpoints(ckpt_dir))

    try:
        killed = sigkill.kill_when(proc, past_half, timeout=timeout)
    except TimeoutError as e:
        raise JaxreproError(f"kill_and_resume: {e}; log: {log_path}") from e
    process = {"command": " ".join(cmd), "pid": proc.pid, "returncode": proc.returncode}
    if not killed and proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise JaxreproError(
            f"kill_and_resume: the training process failed ({proc.returncode}):\n{tail}"
        )
    if not killed:
        return {
            "killed": False,
            "ok": False,
            "metrics_bitwise_equal": False,
            "state_bitwise_equal": False,
            "process": process,
            "error": f"the training process finished (exit {proc.returncode}) before it "
            f"reached a checkpoint at step >= {half} of {total} and could be killed: "
            "nothing was killed, nothing resumed",
        }
    check_same_setup(straight, workdir)
    at_kill = {
        "killed_after_checkpoint": max(sigkill.complete_checkpoints(ckpt_dir)),
        "last_logged_step": _last_train_step(workdir),
    }
    info = loop.run(config, workdir)
    resumes = info.get("resumes") or []
    verdict = _versus(straight, workdir)
    verdict.update(
        killed=True,
        signal="SIGKILL",
        **at_kill,
        resumed_from=resumes[-1]["from_step"] if resumes else None,
        total_steps=total,
        process=process,
    )
    verdict["ok"] = verdict["ok"] and verdict["resumed_from"] == at_kill["killed_after_checkpoint"]
    return verdict


def describe_kill(v: dict) -> str:
    """One line on what the kill-and-resume check did (for the CLI)."""
    if not v["killed"]:
        return f"NOT CHECKED: {v['error']}"
    verdict = "bitwise identical" if v["ok"] else "DIFFERS"
    return (
        f"{verdict}: the training process was SIGKILLed after its checkpoint at step "
        f"{v['killed_after_checkpoint']} of {v['total_steps']} (last logged train step "
        f"{v['last_logged_step']}), resumed from step {v['resumed_from']} to the end"
    )


# ----------------------------------------------------------------------------- D devices vs 1

_METRICS = ("loss", "accuracy", "grad_norm", "update_norm", "param_norm")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def divergence(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Per logged step, ``|a - b|`` and ``|a - b| / max(|a|, |b|)`` of every metric. Pure.

    Rows are matched by ``trajectory.pairs`` (kind, step, phase, split); ``max`` holds
    each metric's largest absolute and relative difference, ``first_difference`` the first
    row that differs, ``unmatched_rows`` how many rows only one side has.
    """
    matched = trajectory.pairs(rows_a, rows_b)
    steps, worst, first = [], {}, None
    for row, o in matched:
        entry = {"kind": row["kind"], "step": row["step"], "phase": row["phase"]}
        if row.get("split"):
            entry["split"] = row["split"]
        for k in _METRICS:
            a, b = row.get(k), o.get(k)
            if not (_number(a) and _number(b)):
                continue
            d = abs(a - b)
            rel = d / max(abs(a), abs(b)) if d else 0.0
            entry[k] = {"abs": d, "rel": rel}
            w = worst.setdefault(k, {"abs": 0.0, "rel": 0.0})
            w["abs"], w["rel"] = max(w["abs"], d), max(w["rel"], rel)
            if d and first is None:
                first = {"kind": row["kind"], "step": row["step"], "metric": k}
        steps.append(entry)
    return {
        "compared_rows": len(steps),
        "unmatched_rows": len(rows_a) + len(rows_b) - 2 * len(matched),
        "first_difference": first,
        "max": worst,
        "steps": steps,
    }


def final_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of a run's latest checkpoint, as numpy, keyed by path (any device count)."""
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise JaxreproError(f"{path} has no checkpoint to compare")
        return ckpts.arrays(step)
    finally:
        ckpts.close()


def array_divergence(a: dict, b: dict, prefix: str = "params/") -> dict:
    """Largest ``|a - b|`` over the arrays under ``prefix``, and ``||a - b|| / ||a||``."""
    names = sorted(k for k in a if k.startswith(prefix))
    if sorted(k for k in b if k.startswith(prefix)) != names:
        raise JaxreproError("the two runs' final states hold different arrays")
    per_leaf, sq_diff, sq_norm = {}, 0.0, 0.0
    for k in names:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        per_leaf[k] = float(np.max(np.abs(x - y))) if x.size else 0.0
        sq_diff += float(np.sum((x - y) ** 2))
        sq_norm += float(np.sum(x**2))
    top = sorted(per_leaf.items(), key=lambda kv: -kv[1])[:5]
    return {
        "max_abs": max(per_leaf.values(), default=0.0),
        "relative_norm": math.sqrt(sq_diff / sq_norm) if sq_norm else 0.0,
        "largest": dict(top),
        "arrays": len(names),
    }


def _device_env(devices: int, cpu: bool) -> dict:
    env = dict(os.environ)
    if cpu:  # simulated devices: the flag must be set before the child's backend starts
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join([*kept, f"{_DEVICE_FLAG}={devices}"])
    cache = jax.config.jax_compilation_cache_dir
    if cache and "JAXREPRO_COMPILE_CACHE_DIR" not in env:
        env["JAXREPRO_COMPILE_CACHE_DIR"] = cache  # the child reuses what this process compiled
    return env


def _on_devices(config, devices: int):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.parallel.num_devices = devices
    return config


def _spawn(runs: list[tuple], devices: int, scratch: str, cpu: bool):
    """One process with ``devices`` devices training each ``(config, workdir)`` in turn."""
    args = []
    for i, (config, workdir) in enumerate(runs):
        path = os.path.join(scratch, f"config_{devices}_{i}.json")
        jsonio.write_json(path, config_lib.to_dict(config))
        args += [path, workdir]
    log = open(os.path.join(scratch, f"log_{devices}.txt"), "w")  # noqa: SIM115 - closed in _wait
    cmd = [sys.executable, "-m", "jaxrepro.audit", *args]
    return subprocess.Popen(cmd, env=_device_env(devices, cpu), stdout=log, stderr=log), log


def _wait(proc, log, timeout: float) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    log.close()
    if code != 0:
        with open(log.name) as f:
            tail = f.read()[-3000:]
        raise JaxreproError(f"device run {proc.args[3::2]} failed ({code}):\n{tail}")


def _counts(devices) -> list[int]:
    counts = [devices] if isinstance(devices, int) else list(devices)
    if not counts or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in counts):
        raise ConfigError(f"--devices must be device counts >= 2, got {devices!r}")
    return sorted(set(counts))


def compare_devices(
    config, steps: int, devices, *, workdir: str | None = None, timeout: float = 1800
) -> dict:
    """Runs ``config`` for ``steps`` steps on 1 device and on each count in ``devices``.

    The runs on D devices share one process with max(D) devices (each on a mesh of its
    own size; the largest twice, for the bitwise repeat). The 1-device run goes on in this
    process when it has one device, else in a process of its own, at the same time.

    Args:
      config: the run's config (shortened to ``steps`` as ``audit`` does).
      steps: global steps to run.
      devices: a device count >= 2, or several.
      workdir: keep the runs here (``d1``, ``d<D>``, ``d<D>_again``); None: a temp dir.
      timeout: seconds the other process may take.

    Returns:
      ``repeat``: the largest count's bitwise verdict run to run; ``versus_one[D]``: the
      per-step metric divergence from the 1-device run and the final parameters' one.
    """
    counts = _counts(devices)
    config = shorten(config, steps)
    cpu = jax.default_backend() == "cpu"
    scratch = workdir or tempfile.mkdtemp(prefix="jaxrepro-devices-")
    os.makedirs(scratch, exist_ok=True)
    path = {d: os.path.join(scratch, f"d{d}") for d in [1, *counts]}
    again = path[counts[-1]] + "_again"
    try:
        runs = [(_on_devices(config, d), path[d]) for d in counts]
        runs.append((runs[-1][0], again))
        procs = [_spawn(runs, counts[-1], scratch, cpu)]
        one = (_on_devices(config, 1), path[1])
        if jax.device_count() == 1:
            loop.run(*one)
        else:
            procs.append(_spawn([one], 1, scratch, cpu))
        for proc, log in procs:
            _wait(proc, log, timeout)
        reference, ref_arrays = Workdir(path[1]).metrics(), final_arrays(path[1])
        report = {"devices": counts, "steps": steps, "repeat": _versus(path[counts[-1]], again)}
        report["versus_one"] = {
            str(d): {
                "mesh": Workdir(path[d]).read_run()["mesh"]["devices"],
                "divergence": divergence(reference, Workdir(path[d]).metrics()),
                "params": array_divergence(ref_arrays, final_arrays(path[d])),
            }
            for d in counts
        }
        return report
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _device_worker(argv: list[str]) -> int:
    """``python -m jaxrepro.audit CONFIG_JSON WORKDIR [CONFIG_JSON WORKDIR ...]``: trains
    each config in its workdir (the device runs, and the run that ``kill_and_resume``
    kills)."""
    cache = os.environ.get("JAXREPRO_COMPILE_CACHE_DIR")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    pairs = argv[1:]
    if not pairs or len(pairs) % 2:
        print("usage: python -m jaxrepro.audit CONFIG_JSON WORKDIR [...]", file=sys.stderr)
        return 2
    for config_path, workdir in zip(pairs[::2], pairs[1::2], strict=True):
        info = loop.run(config_lib.from_dict(jsonio.read_json(config_path)), workdir)
        if info["status"] != "done":
            print(f"{workdir}: {info['status']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(_device_worker(sys.argv))

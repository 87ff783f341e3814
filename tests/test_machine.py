"""The platform fingerprint, its comparisons, and portable mode's pieces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from helpers import REPO, snapshot

from jaxrepro import machine
from jaxrepro import replay as replay_lib
from jaxrepro.errors import ConfigError
from jaxrepro.models import contract
from jaxrepro.train import runinfo

ZEN3 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7B13
flags		: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2 sha_ni

processor	: 1
vendor_id	: AuthenticAMD
"""


def test_cpu_info_reads_vendor_family_model_and_isa():
    cpu = machine.cpu_info(ZEN3)
    assert (cpu["vendor"], cpu["family"], cpu["model"]) == ("AuthenticAMD", "25", "1")
    assert cpu["isa"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]  # ISA_FEATURES' order
    assert cpu["model_name"] == "AMD EPYC 7B13"


def _info(**cpu_over):
    info = runinfo.platform_info()
    info = json.loads(json.dumps(info))
    info["cpu"].update(cpu_over)
    info["fingerprint"] = machine.fingerprint(info)
    return info


def test_fingerprint_names_the_cpu_natively_and_only_the_level_in_portable_mode():
    a, b = _info(), _info(model="99", isa=["sse4_2", "avx", "avx2", "fma"])
    assert machine.differences(a["fingerprint"], b["fingerprint"])
    pa, pb = dict(a, portable=True), dict(b, portable=True)
    assert machine.fingerprint(pa) == machine.fingerprint(pb)
    assert machine.fingerprint(pa)["cpu"]["portable"] == machine.PORTABLE_LEVEL
    # the thread count and XLA flags still count in portable mode
    pc = dict(pa, cpu_threads=pa["cpu_threads"] + 1)
    assert machine.differences(machine.fingerprint(pa), machine.fingerprint(pc))


def test_compare_platforms_refuses_unless_forced():
    a, b = _info(), _info(family="1")
    assert machine.compare_platforms(a, a, force=False, what="x")["bitwise_expected"]
    with pytest.raises(machine.PlatformMismatch, match="cpu.family"):
        machine.compare_platforms(a, b, force=False, what="x")
    forced = machine.compare_platforms(a, b, force=True, what="x")
    assert forced["forced"] and not forced["bitwise_expected"]
    assert any("cpu.family" in d for d in forced["differences"])
    with pytest.raises(machine.PlatformMismatch, match="recorded no platform"):
        machine.compare_platforms({}, a, force=False, what="x")


def test_portable_flags_are_parsed_by_value():
    flags = " ".join(machine.PORTABLE_FLAGS)
    assert machine.portable_flags_in_force(flags)
    assert not machine.portable_flags_in_force("--xla_cpu_max_isa=AVX2")
    assert not machine.portable_flags_in_force(flags + " --xla_cpu_max_isa=AVX512")  # last wins
    assert machine.effective_max_isa("") == "native"
    assert machine.effective_max_isa("--xla_cpu_max_isa=AVX") == "AVX"


def test_portable_mode_refused_once_the_backend_started_without_its_flags(monkeypatch):
    jax.devices()  # this test process's backend has started
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ConfigError, match="before JAX starts"):
        machine.apply_portable(True)
    assert machine.apply_portable(False) == []
    env = {"XLA_FLAGS": "--xla_foo=1"}
    assert machine.apply_portable(True, env) == list(machine.PORTABLE_FLAGS)
    assert machine.portable_flags_in_force(env["XLA_FLAGS"]) and "--xla_foo=1" in env["XLA_FLAGS"]


def test_check_portable_refuses_a_cpu_without_avx2_fma():
    cpu = machine.cpu_info(ZEN3.replace(" avx2 fma", ""))
    with pytest.raises(ConfigError, match="AVX2|avx2"):
        machine.check_portable(True, "cpu", cpu, " ".join(machine.PORTABLE_FLAGS))
    machine.check_portable(False, "cpu", cpu, "")  # native mode: no requirement


# ----------------------------------------------------------------------------- contraction


@pytest.mark.parametrize("k", [7, 256, 600, 1000])
def test_chunked_dot_is_the_matmul_and_its_gradient(k):
    r = np.random.default_rng(k)
    a = jnp.asarray(r.standard_normal((33, k)), jnp.float32)
    b = jnp.asarray(r.standard_normal((k, 17)), jnp.float32)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = contract.dot(a, b, 256)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    assert contract.dot(a, b, 0).tolist() == jnp.dot(a, b).tolist()  # native: the plain dot

    w = jnp.asarray(r.standard_normal((33, 17)), jnp.float32)

    def loss(x, y, chunk):
        return jnp.sum(contract.dot(x, y, chunk) * w)

    ga, gb = jax.grad(loss, argnums=(0, 1))(a, b, 256)
    w64 = np.asarray(w, np.float64)
    np.testing.assert_allclose(ga, w64 @ np.asarray(b, np.float64).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gb, np.asarray(a, np.float64).T @ w64, rtol=1e-5, atol=1e-4)


def test_chunked_dot_adds_the_chunks_in_order():
    """Bit for bit the sum of the chunks' own matmuls, added first to last."""
    r = np.random.default_rng(0)
    a = jnp.asarray(r.standard_normal((16, 700)), jnp.float32)
    b = jnp.asarray(r.standard_normal((700, 8)), jnp.float32)
    parts = [jnp.dot(a[:, s : s + 256], b[s : s + 256]) for s in (0, 256, 512)]
    want = (parts[0] + parts[1]) + parts[2]
    assert np.array_equal(np.asarray(jax.jit(contract.dot, static_argnums=2)(a, b, 256)), want)


def _eigen_kc(l1_bytes: int) -> int:
    """Eigen's depth block for float32 GEBP with XLA's AVX build (mr=24, nr=4), threaded."""
    kc = min((l1_bytes - 24 * 4 * 4) // (24 * 4 + 4 * 4), 320)
    return kc - kc % 8


def test_native_matmul_sums_in_blocks_sized_by_the_l1_cache():
    """Why native bits differ between CPUs: the contraction is blocked by the L1 size.

    A long contraction equals, bit for bit, the sum of its Eigen-sized blocks added in
    order, and the block length follows from this CPU's L1 data cache.
    """
    l1 = machine.cpu_info()["caches_kib"].get("L1d")
    # The suite's own flag (tests/conftest.py) leaves Eigen's matmul, a library call, alone.
    if not l1 or os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip():
        pytest.skip("needs the L1d size from sysfs and XLA's default flags")
    kc = _eigen_kc(l1 * 1024)
    r = np.random.default_rng(1)
    a = jnp.asarray(r.standard_normal((4096, 144)), jnp.float32)
    b = jnp.asarray(r.standard_normal((4096, 64)), jnp.float32)
    f = jax.jit(lambda x, y: x.T @ y)
    native = np.asarray(f(a, b))
    blocks = [np.asarray(f(a[s : s + kc], b[s : s + kc])) for s in range(0, 4096, kc)]
    acc = blocks[0]
    for part in blocks[1:]:
        acc = acc + part
    assert np.array_equal(native, acc), f"not blocks of {kc} terms (L1d {l1} KiB)"
    other = 288 if kc != 288 else 320  # another L1 size's blocking gives other bits
    blocks = [np.asarray(f(a[s : s + other], b[s : s + other])) for s in range(0, 4096, other)]
    acc2 = blocks[0]
    for part in blocks[1:]:
        acc2 = acc2 + part
    assert not np.array_equal(native, acc2)


# ----------------------------------------------------------------------------- where it is used


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    from helpers import tiny_digits

    from jaxrepro.train import loop

    path = str(tmp_path_factory.mktemp("fp") / "run")
    loop.run(tiny_digits(data_dir), path)
    return path


def test_run_json_records_the_fingerprint(small_run):
    with open(os.path.join(small_run, "run.json")) as f:
        platform = json.load(f)["platform"]
    assert platform["fingerprint"] == machine.fingerprint(platform)
    assert platform["fingerprint"]["cpu"]["isa"] == machine.cpu_info()["isa"]
    assert platform["xla_cpu_max_isa"] == machine.effective_max_isa(platform["xla_flags"])
    assert platform["portable"] is False


def test_replay_refuses_a_run_recorded_on_another_cpu(small_run, tmp_path):
    """Fails if replay skips the fingerprint comparison: the tampered run must be refused."""
    run = str(tmp_path / "run")
    shutil.copytree(small_run, run)
    with open(os.path.join(run, "run.json")) as f:
        info = json.load(f)
    info["platform"]["cpu"]["model"] = "not this one"
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(info, f)
    before = snapshot(run)
    with pytest.raises(machine.PlatformMismatch, match="cpu.model"):
        replay_lib.replay(run, from_step=8)
    assert snapshot(run) == before  # refused before any work: nothing written
    s = replay_lib.replay(run, from_step=8, force=True)
    assert s["platform_check"]["forced"] and not s["platform_check"]["bitwise_expected"]
    assert s["bitwise_equal"]  # same machine after all: the bits still agree


def test_portable_cli_run_sets_its_flags_and_refuses_lax_convolutions(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "jaxrepro", "train", "--config=configs/digits.py:smoke",
           f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data_dir}",
           "--config.determinism.portable=True", "--config.model.conv_impl=lax",
           "--config.pretrain.steps=1", "--config.finetune.steps=0"]  # fmt: skip
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "determinism.portable needs model.conv_impl" in proc.stderr


def test_study_refuses_to_mix_platforms_unless_forced(small_run, tmp_path, data_dir):
    """Fails if a resumed study skips the comparison of its finished runs' fingerprints."""
    from types import SimpleNamespace

    from helpers import tiny_digits

    from jaxrepro.study import _platform_check

    out = tmp_path / "study"
    for name in ("same", "other"):
        shutil.copytree(small_run, out / "runs" / name)
    config = tiny_digits(data_dir)
    runs = [SimpleNamespace(name="same"), SimpleNamespace(name="other")]
    assert _platform_check(config, str(out), runs, force=False) == {}
    path = out / "runs" / "other" / "run.json"
    info = json.loads(path.read_text())
    info["platform"]["cpu"]["isa"] = ["sse4_2", "avx", "avx2", "fma"]
    path.write_text(json.dumps(info))
    with pytest.raises(machine.PlatformMismatch, match="cpu.isa"):
        _platform_check(config, str(out), runs, force=False)
    assert list(_platform_check(config, str(out), runs, force=True)) == ["other"]

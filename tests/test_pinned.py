"""Pinned bits: the smoke config's hashes and every metrics row, per platform fingerprint.

Native mode is checked where the table has this machine's fingerprint (else skipped, with
the reason); portable mode's entry matches every x86-64 CPU with AVX2 and FMA, so it runs
on each of them. Both runs are real ``jaxrepro train`` processes pinned to 2 CPUs, run
side by side. A change that alters the bits updates tests/pinned/ in the same commit
(tests/pinned_smoke.py says how), with the reason in its message.
"""

import os

import pytest
from pinned_smoke import THREADS, entry_for, finish, first_difference, load_table, rows_of
from pinned_smoke import start_smoke as start

from jaxrepro import machine


@pytest.fixture(scope="module")
def smoke_runs(data_dir, tmp_path_factory):
    """Both modes' (run.json, rows), or the reason a mode could not run here."""
    base = tmp_path_factory.mktemp("pinned")
    # The first build of the TFDS data must not race between the two processes.
    from jaxrepro import data as data_lib

    data_lib.load("digits", "train", data_dir=data_dir)
    data_lib.load("digits_shifted", "train", data_dir=data_dir)
    cpu = machine.cpu_info()
    modes = {"native": False}
    if machine.portable_capable(cpu):
        modes["portable"] = True
    procs = {m: start(str(base / m), data_dir, portable=p) for m, p in modes.items()}
    out = {}
    for mode, proc in procs.items():
        if proc is None:
            out[mode] = f"needs {THREADS} CPUs, this process may use {len(os.sched_getaffinity(0))}"
        else:
            out[mode] = finish(proc, str(base / mode))
    if "portable" not in modes:
        out["portable"] = f"portable mode needs x86-64 with AVX2+FMA; this CPU: {cpu}"
    return out


def _check(result, mode: str):
    if isinstance(result, str):
        pytest.skip(result)
    info, rows = result
    fp = info["platform"]["fingerprint"]
    entry = entry_for(fp, load_table())
    if entry is None:
        pytest.skip(
            f"no pinned {mode} entry for this platform ({machine.fingerprint_id(fp)}: {fp}); "
            "record one with tests/pinned_smoke.py"
        )
    assert entry["mode"] == mode
    assert info["init_param_hash"] == entry["init_param_hash"]
    diff = first_difference(rows, rows_of(entry))
    assert diff is None, f"{mode} smoke rows differ from the pinned ones at {diff}"
    assert info["final_param_hash"] == entry["final_param_hash"]
    return info


def test_native_smoke_bits_match_the_pinned_table(smoke_runs):
    info = _check(smoke_runs["native"], "native")
    assert info["platform"]["portable"] is False


def test_portable_smoke_bits_match_on_every_avx2_fma_cpu(smoke_runs):
    info = _check(smoke_runs["portable"], "portable")
    assert info["platform"]["portable"] is True
    assert machine.portable_flags_in_force(info["platform"]["xla_flags"])


def test_portable_entry_names_no_cpu_model():
    """The portable fingerprint holds the ISA level only, so every AVX2+FMA CPU matches."""
    portable = [e for e in load_table() if e["mode"] == "portable"]
    assert portable
    for e in portable:
        assert e["fingerprint"]["cpu"] == {"portable": machine.PORTABLE_LEVEL, "arch": "x86_64"}


def test_native_and_portable_bits_differ(smoke_runs):
    """Portable mode changes the summation order, so it must not be the native program."""
    if any(isinstance(smoke_runs[m], str) for m in ("native", "portable")):
        pytest.skip("needs both modes")
    assert (
        smoke_runs["native"][0]["final_param_hash"] != smoke_runs["portable"][0]["final_param_hash"]
    )

"""The CLI re-executes itself once with glibc's huge-page tunable for malloc."""

import json
import os
import subprocess
import sys

import pytest
from helpers import TINY_FLAGS

from jaxrepro.plumbing import procenv

LINUX = dict(system="Linux", libc="glibc", thp="madvise")


def test_wanted_env_adds_the_tunable_once():
    env = procenv.wanted_env({"PATH": "/bin"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == procenv.TUNABLE and env[procenv.MARK] == "1"
    assert env["PATH"] == "/bin"
    # other tunables are kept, the new one appended with glibc's ':' separator
    other = procenv.wanted_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{procenv.TUNABLE}"
    # never twice, never over the user's own choice, and only where it means something
    assert procenv.wanted_env(env, **LINUX) is None
    assert procenv.wanted_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None
    assert procenv.wanted_env({procenv.DISABLE: "0"}, **LINUX) is None
    assert procenv.wanted_env({}, **dict(LINUX, system="Darwin")) is None
    assert procenv.wanted_env({}, **dict(LINUX, libc="")) is None  # musl
    assert procenv.wanted_env({}, **dict(LINUX, thp="never")) is None
    assert procenv.wanted_env({}, **dict(LINUX, thp=None)) is None
    assert procenv.wanted_env({}, **dict(LINUX, thp="always")) is not None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert procenv._thp_mode(str(f)) == "madvise"
    assert procenv._thp_mode(str(tmp_path / "missing")) is None


def _runs_here() -> bool:
    return procenv.wanted_env({}, **procenv.platform_facts()) is not None


@pytest.mark.skipif(not _runs_here(), reason="needs Linux, glibc and transparent huge pages")
@pytest.mark.parametrize("disable", [False, True])
def test_cli_reexecutes_with_the_tunable_and_records_it(data_dir, tmp_path, disable):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", procenv.MARK)}
    if disable:
        env[procenv.DISABLE] = "0"
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxrepro", "train", *TINY_FLAGS,
           "--config.pretrain.steps=2", "--config.finetune.steps=0",
           f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((workdir / "run.json").read_text())
    assert info["platform"]["glibc_tunables"] == ("" if disable else procenv.TUNABLE)

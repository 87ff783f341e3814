"""Replaying a run recorded on several devices onto fewer (device-count-invariant mode).

`jaxrepro replay` re-executes itself under the run's recorded process setup (XLA flags
with the simulated device count, CPU threads) and says so; in invariant mode the replay on
one device then equals the 4-device original bit for bit, eval rows included.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from test_cli_errors import cli

from jaxrepro import machine
from jaxrepro.errors import WorkdirError
from jaxrepro.train.invariant import setup

_FLAG = "--xla_force_host_platform_device_count"


def _train_flags(data_dir, workdir):
    return [
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.pretrain.steps=4",
        "--config.finetune.steps=4",
        "--config.pretrain.eval_every=2",
        "--config.finetune.eval_every=2",
        "--config.checkpoint.every=2",
        "--config.determinism.device_invariant=True",
        "--config.determinism.groups=4",
    ]


@pytest.fixture(scope="module")
def four_device_run(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("devices") / "run")
    r = cli("train", *_train_flags(data_dir, run), env_extra={"XLA_FLAGS": f"{_FLAG}=4"})
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(run, "run.json")) as f:
        info = json.load(f)
    assert info["mesh"]["devices"] == 4 and info["platform"]["local_device_count"] == 4
    return run


def test_replay_on_one_device_reexecutes_and_is_bitwise(four_device_run):
    # Started in a one-device process: the replay must notice and recreate the setup.
    r = cli(
        "replay", f"--workdir={four_device_run}", "--from_step=4", "--devices=1", "--name=one",
        env_extra={"XLA_FLAGS": ""},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "re-executed under the run's recorded process setup" in r.stdout
    assert "on 1 device(s) (the run used 4)" in r.stdout
    assert "bit for bit" in r.stdout
    with open(os.path.join(four_device_run, "replays", "one", "replay_summary.json")) as f:
        s = json.load(f)
    assert s["bitwise_equal"] and s["devices"] == {"recorded": 4, "replay": 1}
    assert s["setup"]["reexecuted"] and s["setup"]["differences"] == []
    assert any(d.startswith("XLA_FLAGS") for d in s["setup"]["differed"])
    kinds = {row["kind"] for row in s["steps"]}
    assert kinds == {"train", "eval"}  # eval rows are covered by the invariance too
    with open(os.path.join(four_device_run, "replays", "one", "run.json")) as f:
        replay_info = json.load(f)
    assert replay_info["mesh"]["devices"] == 1
    assert replay_info["platform"]["local_device_count"] == 4  # the recorded setup


def test_replay_setup_record_without_reexec(four_device_run, monkeypatch):
    monkeypatch.delenv(setup.REEXEC_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    rec = setup.replay_process_setup(four_device_run, ["jaxrepro", "replay"], reexec=False)
    assert not rec["reexecuted"]
    assert rec["recorded"]["XLA_FLAGS"] == f"{_FLAG}=4"
    assert rec["differences"] and rec["differences"][0].startswith("XLA_FLAGS")
    monkeypatch.setenv("XLA_FLAGS", f"{_FLAG}=4")
    rec = setup.replay_process_setup(four_device_run, ["jaxrepro", "replay"], reexec=False)
    assert rec["differed"] == [] and rec["differences"] == []


def test_replay_setup_refuses_a_corrupt_run_json(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(WorkdirError, match="process setup"):
        setup.replay_process_setup(str(tmp_path), ["jaxrepro", "replay"])
    (tmp_path / "run.json").write_text(json.dumps({"status": "done"}))
    with pytest.raises(WorkdirError, match="platform"):
        setup.replay_process_setup(str(tmp_path), ["jaxrepro", "replay"])
    assert setup.replay_process_setup(str(tmp_path / "missing"), ["x"]) is None


class _Exec(Exception):
    """Raised by the stand-in for os.execve: where a replay would re-execute itself."""


def _write_record(path, **platform):
    base = {"backend": "cpu", "local_device_count": 1, "xla_flags": ""}
    base["cpu_threads"] = machine.cpu_threads()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"platform": dict(base, **platform)}, f)
    return str(path)


def test_replay_applies_only_the_recorded_settings(tmp_path, monkeypatch):
    """A plain one-device run recorded no device-count flag: its replay adds none, runs
    in a process like the run's without re-executing, and logs only what was recorded."""
    plain = _write_record(tmp_path / "plain")
    env = setup.setup_for_replay(os.path.join(plain, "run.json"))
    assert env["XLA_FLAGS"] == "" and setup.not_recreated(os.path.join(plain, "run.json")) == []
    execs, logged = [], []

    def execve(*args):
        execs.append(args)
        raise _Exec

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(
        logging.getLogger("jaxrepro"), "warning", lambda m, *a: logged.append(m % a)
    )
    monkeypatch.delenv(setup.REEXEC_ENV, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    rec = setup.replay_process_setup(plain, ["jaxrepro", "replay"])
    assert execs == [] and logged == [] and rec["differed"] == [] and not rec["reexecuted"]
    # a shell with a flag the run never had: re-executed with the recorded flags (none)
    monkeypatch.setenv("XLA_FLAGS", f"{_FLAG}=4")
    with pytest.raises(_Exec):
        setup.replay_process_setup(plain, ["jaxrepro", "replay", f"--workdir={plain}"])
    ((_, argv, child),) = execs
    assert argv[-2:] == ["replay", f"--workdir={plain}"]
    assert child["XLA_FLAGS"] == "" and child["JAX_PLATFORMS"] == "cpu"
    assert json.loads(child[setup.REEXEC_ENV]) == [f"XLA_FLAGS: recorded '', here '{_FLAG}=4'"]
    (line,) = logged
    assert "re-executing with the settings run.json records" in line
    threads = machine.cpu_threads()
    assert line.endswith(
        f"records: JAXREPRO_CPU_THREADS='{threads}', JAX_PLATFORMS='cpu', XLA_FLAGS=''"
    )
    # several CPU devices the recorded flags do not explain: no flag is invented for them
    other = _write_record(tmp_path / "eight", local_device_count=8)
    assert setup.setup_for_replay(os.path.join(other, "run.json"))["XLA_FLAGS"] == ""
    monkeypatch.setenv("XLA_FLAGS", "")
    logged.clear()
    rec = setup.replay_process_setup(other, ["jaxrepro", "replay"])
    assert rec["differed"] == [] and len(execs) == 1
    assert rec["not_recreated"] and "had 8 CPU devices" in rec["not_recreated"][0]
    assert logged and "not recorded" in logged[0]
    # a recorded count flag is kept, at the recorded count
    flagged = _write_record(tmp_path / "four", local_device_count=4, xla_flags=f"{_FLAG}=4")
    assert setup.setup_for_replay(os.path.join(flagged, "run.json"))["XLA_FLAGS"] == f"{_FLAG}=4"
    assert setup.not_recreated(os.path.join(flagged, "run.json")) == []

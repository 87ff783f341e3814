"""Replaying a run recorded on several devices onto fewer (device-count-invariant mode).

`jaxrepro replay` re-executes itself under the run's recorded process setup (XLA flags
with the simulated device count, CPU threads) and says so; in invariant mode the replay on
one device then equals the 4-device original bit for bit, eval rows included.
"""

from __future__ import annotations

import json
import os

import pytest
from test_cli_errors import cli

from jaxrepro.errors import WorkdirError
from jaxrepro.invariant import setup

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

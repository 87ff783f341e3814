"""``jaxrepro status``: a real training process watched while it runs, after a SIGKILL,
and once resumed to the end; study directories; and directories that are neither."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import TINY_FLAGS, spawn_train

from jaxrepro import status
from jaxrepro.__main__ import main
from jaxrepro.plumbing import jsonio

# Long enough to be watched while it runs; heartbeats every 0.2 s.
WATCHED = [*TINY_FLAGS, "--config.pretrain.steps=120", "--config.runtime.heartbeat_every_s=0.2"]


def _spawn(workdir, data_dir):
    return spawn_train(WATCHED, workdir, data_dir)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.05)
    raise AssertionError("timed out")


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["jaxrepro", "status", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_of_a_running_then_sigkilled_then_finished_run(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    proc = _spawn(workdir, data_dir)
    try:
        # Running: a heartbeat with a rate, from a process that is alive.
        def running():
            s = status.status(workdir) if os.path.exists(os.path.join(workdir, "run.json")) else {}
            return s if s.get("state") == "running" and s.get("steps_per_s") else None

        s = _wait_for(running, proc)
        assert s["pid"] == proc.pid and s["end"] == 126 and 0 < s["step"] < 126
        assert s["eta_s"] > 0
        code, out, _ = _cli(capsys, workdir)
        assert code == 0 and "running" in out and f"pid {proc.pid}" in out and "ETA" in out
        # SIGKILL: stale as soon as the process is dead, even before it is reaped.
        proc.send_signal(signal.SIGKILL)
        s = _wait_for(lambda: (s := status.status(workdir))["state"] == "stale" and s, None, 10)
        assert str(proc.pid) in s["note"] and "resume" in s["note"]
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    code, out, _ = _cli(capsys, workdir)
    assert code == 0 and "stale" in out
    # Resumed to the end: finished, with its drop-offs listed.
    proc = _spawn(workdir, data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    proc.stderr.close()
    s = status.status(workdir)
    assert s["state"] == "finished" and s["status"] == "done" and s["step"] == s["end"] == 126
    events = jsonio.read_json(os.path.join(workdir, "dropoffs.json"))
    assert len(s["dropoffs"]) == len(events)
    code, out, _ = _cli(capsys, workdir)
    assert code == 0 and "finished (done)" in out and f"drop-offs {len(events)}" in out


def _fake_run(workdir, run: dict | None, beat: dict | None):
    os.makedirs(workdir)
    jsonio.write_json(os.path.join(workdir, "config.json"), {})
    if run is not None:
        jsonio.write_json(os.path.join(workdir, "run.json"), run)
    if beat is not None:
        jsonio.write_json(os.path.join(workdir, "heartbeat.json"), beat)


def test_heartbeat_of_another_host_is_judged_by_its_age(tmp_path):
    now = 1_000_000.0
    beat = dict(host="elsewhere", pid=1, time=now - 5, step=10, end=1000, steps_per_s=2.0)
    _fake_run(str(tmp_path / "fresh"), {"status": "running"}, dict(beat, every_s=10.0))
    _fake_run(str(tmp_path / "old"), {"status": "running"}, dict(beat, every_s=1.0))
    fresh = status.run_status(str(tmp_path / "fresh"), now=now + 60)  # 65 s <= 3*10+60
    old = status.run_status(str(tmp_path / "old"), now=now + 60)  # 65 s > 3*1+60
    assert fresh["state"] == "running" and old["state"] == "stale"
    assert fresh["eta_s"] == pytest.approx(990 / 2.0 - 65)


def test_failed_and_stopped_runs(tmp_path):
    me = status.process_identity()
    _fake_run(str(tmp_path / "f"), {"status": "failed", "error": "ValueError: boom"}, None)
    _fake_run(str(tmp_path / "s"), {"status": "running"}, dict(me, time=0, ended=1, step=3))
    _fake_run(str(tmp_path / "alive"), {"status": "running"}, dict(me, time=time.time()))
    assert status.run_status(str(tmp_path / "f"))["error"] == "ValueError: boom"
    assert status.run_status(str(tmp_path / "s"))["state"] == "stopped"
    assert status.run_status(str(tmp_path / "alive"))["state"] == "running"  # this process


def test_study_status_counts_runs_and_estimates_time_left(tmp_path, capsys):
    out = tmp_path / "study"
    (out / "runs").mkdir(parents=True)
    jsonio.write_json(str(out / "study.json"), {"runs": ["aug0", "aug1", "aug2", "aug3"]})
    me = status.process_identity()
    now = time.time()
    _fake_run(str(out / "runs/aug0"), {"status": "done", "wall_time_s": 100.0}, None)
    _fake_run(
        str(out / "runs/aug1"),
        {"status": "running"},
        dict(me, time=now, step=50, end=100, steps_per_s=1.0, phase="pretrain"),
    )
    _fake_run(str(out / "runs/aug2"), {"status": "failed", "error": "RuntimeError: x"}, None)
    s = status.status(str(out), now=now)
    assert s["counts"] == {"finished": 1, "running": 1, "failed": 1, "not started": 1}
    assert s["eta_s"] == pytest.approx(50 + 100)  # aug1's 50 s, then aug3 at aug0's 100 s
    code, text, _ = _cli(capsys, str(out))
    assert code == 0
    assert "4 runs: 1 finished, 1 running, 1 failed, 1 not started; ETA about 2m30s" in text
    assert "RuntimeError: x" in text


def test_status_of_a_directory_that_is_neither_run_nor_study(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    before = sorted(os.listdir(tmp_path / "other"))
    code, _, err = _cli(capsys, str(tmp_path / "other"))
    assert code == 2 and "neither a jaxrepro run" in err
    assert sorted(os.listdir(tmp_path / "other")) == before
    code, _, err = _cli(capsys, str(tmp_path / "missing"))
    assert code == 2 and "no such directory" in err
    code, _, err = _cli(capsys, str(tmp_path), "extra")
    assert code == 2 and "unexpected arguments ['extra']" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.json").write_text("{not json")
    code, _, err = _cli(capsys, str(broken))
    assert code == 2 and "study.json is unreadable" in err


def test_watch_stops_when_nothing_runs(tmp_path, capsys, monkeypatch):
    from absl import flags

    _fake_run(str(tmp_path / "r"), {"status": "done", "step": 4, "total_steps": 4}, None)
    monkeypatch.setattr(flags.FLAGS, "watch", True)
    code, out, _ = _cli(capsys, str(tmp_path / "r"))
    assert code == 0 and out.count("finished (done)") == 1

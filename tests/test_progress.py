"""Progress: a bar on a terminal, periodic log lines elsewhere, and no bits changed; a
study's runs done / running / left and its ETA, from the runs' heartbeats."""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest
from helpers import rows_equal, tiny_digits

from jaxrepro import config as config_lib
from jaxrepro.errors import ConfigError
from jaxrepro.plumbing import jsonio
from jaxrepro.study import progress as study_progress
from jaxrepro.train import loop
from jaxrepro.train.progress import Progress, duration, resolve_mode
from jaxrepro.workdir import Workdir


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal (and has no file descriptor behind it)."""

    def isatty(self):
        return True


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# ----------------------------------------------------------------------------- one loop


def test_auto_mode_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", FakeTTY()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode("auto", object()) == "lines"  # no isatty at all
    assert resolve_mode("off", FakeTTY()) == "off"
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        resolve_mode("fancy", FakeTTY())


def test_bar_on_a_terminal_shows_steps_rate_eta_and_note():
    tty = FakeTTY()
    p = Progress("train", 0, 100, mode="auto", stream=tty)
    assert p.mode == "bar"
    p.advance(8, "pretrain 8/80, loss 2.3000")
    p.bar.refresh()
    p.advance(40, "pretrain 40/80, loss 1.2345")
    p.bar.refresh()
    p.close()
    text = tty.getvalue()
    last = text.split("\r")[-1]  # the bar as the terminal shows it last
    assert last.startswith("train:  40%|") and "40/100" in last
    assert " steps/s" in last and "pretrain 40/80, loss 1.2345" in last
    assert "<" in last  # elapsed<remaining: tqdm's ETA
    assert "\r" in text and "40/100" not in text.split("\r")[1]  # redrawn in place


def test_log_lines_print_above_the_bar_not_through_it(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    logger = logging.getLogger("jaxrepro")
    handler = logging.StreamHandler(sys.stderr)  # as the command line sets it up
    logger.addHandler(handler)
    try:
        p = Progress("train", 0, 50, mode="auto")  # sys.stderr: the fake terminal
        p.advance(10, "pretrain 10/50")
        p.bar.refresh()
        logger.warning("drop-off: a spike")
        p.close()
    finally:
        logger.removeHandler(handler)
    text = tty.getvalue()
    before, after = text.split("drop-off: a spike\n")
    # the bar was cleared first (tqdm.write) and drawn again below the line
    assert before.rstrip(" ").endswith("\r") and "10/50" in after
    assert logger.handlers.count(handler) == 0  # the redirect is undone


def test_lines_mode_logs_every_period_with_rate_from_the_first_block(caplog):
    clock = Clock()
    stream = io.StringIO()  # not a terminal
    p = Progress("train", 0, 100, mode="auto", every_s=10, stream=stream, clock=clock)
    assert p.mode == "lines" and p.bar is None
    seen = []
    with caplog.at_level(logging.INFO, logger="jaxrepro"):
        for t, step in ((0, 8), (5, 16), (11, 24), (15, 32), (22, 40)):
            clock.t = 1000.0 + t
            p.advance(step, f"pretrain {step}/80, loss 1.0000")
            seen.append(len(caplog.records))
    p.close()
    assert seen == [0, 0, 1, 1, 2]  # 11 s and 22 s after the first block: 10 s apart
    first, second = (r.getMessage() for r in caplog.records)
    # 16 steps in 11 s after the first block (compile time left out); 76 left
    assert first == "train: step 24/100 (pretrain 24/80, loss 1.0000) | 1.45 steps/s | ETA 52s"
    assert second.startswith("train: step 40/100") and "| 1.45 steps/s | ETA 41s" in second
    assert stream.getvalue() == ""  # lines go to the log, nothing drawn


def test_off_mode_reports_nothing(caplog):
    tty, clock = FakeTTY(), Clock()
    p = Progress("train", 0, 10, mode="off", every_s=1e-9, stream=tty, clock=clock)
    with caplog.at_level(logging.INFO, logger="jaxrepro"):
        for step in range(1, 11):
            clock.t += 1
            p.advance(step)
    p.close()
    assert tty.getvalue() == "" and not caplog.records


def test_duration_text():
    assert [duration(x) for x in (None, 0, 42.4, 185, 7800, float("inf"))] == [
        "?", "0s", "42s", "3m05s", "2h10m", "?"
    ]  # fmt: skip


def test_unknown_progress_mode_is_refused_naming_the_field(data_dir):
    config = tiny_digits(data_dir)
    config.runtime.progress = "fancy"
    with pytest.raises(ConfigError, match="runtime.progress"):
        config_lib.validate(config)


def test_progress_bar_changes_no_bits(data_dir, tmp_path, monkeypatch):
    """The same tiny run without progress and with a bar on a (fake) terminal: the same
    rows and final hashes. (Log lines and the bar are fed the same way: Record._report.)"""
    plain = loop.run(tiny_digits(data_dir, runtime__progress="off"), str(tmp_path / "off"))
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = loop.run(tiny_digits(data_dir, runtime__progress="auto"), str(tmp_path / "bar"))
    monkeypatch.undo()
    last = tty.getvalue().split("\r")[-1]
    assert "14/14" in last and "finetune 6/6, loss " in last  # the bar ran to the end
    want = Workdir(str(tmp_path / "off")).metrics()
    assert rows_equal(Workdir(str(tmp_path / "bar")).metrics(), want)
    assert bar["final_state_hash"] == plain["final_state_hash"]


# ----------------------------------------------------------------------------- a study


def _beat(pid, step, end, rate, t, phase="pretrain"):
    return {"pid": pid, "step": step, "end": end, "steps_per_s": rate, "time": t,
            "phase": phase, "host": "h", "every_s": 10.0}  # fmt: skip


def test_running_view_from_a_heartbeat():
    now = 1000.0
    view = study_progress.running_view(_beat(7, 40, 240, 2.0, now - 4), 7, 30.0, now)
    # 200 steps at 2 steps/s, the heartbeat 4 s old
    assert view == {"elapsed_s": 30.0, "state": "running", "left_s": 96.0, "phase": "pretrain",
                    "step": 40, "end": 240, "steps_per_s": 2.0}  # fmt: skip
    # the previous session's heartbeat, none yet, or one that ended: starting
    for beat in (_beat(6, 40, 240, 2.0, now), None, dict(_beat(7, 9, 240, 2.0, now), ended=1)):
        assert study_progress.running_view(beat, 7, 3.0, now)["state"] == "starting"
    # a heartbeat before the first rate: running, time left unknown
    assert study_progress.running_view(_beat(7, 0, 240, None, now), 7, 9.0, now)["left_s"] is None


def test_study_eta_fills_the_slots_as_they_free():
    def run(left, elapsed=0.0):
        return {"left_s": left, "elapsed_s": elapsed}

    # 2 slots ending in 30 and 50 s; 3 runs of 100 s left: 30->130, 50->150, 130->230
    assert study_progress.study_eta(2, [run(30), run(50)], 3, 100.0) == 230.0
    # a free slot starts a run at once; a run without a rate takes run_s in all
    assert study_progress.study_eta(3, [run(None, 40.0)], 2, 100.0) == 100.0
    assert study_progress.study_eta(1, [], 0, None) == 0.0
    assert study_progress.study_eta(1, [], 2, None) is None  # nothing finished, none running
    assert study_progress.study_eta(1, [run(None)], 0, None) is None


def test_study_line_from_synthetic_heartbeats(tmp_path, caplog):
    out = str(tmp_path)
    names = ["aug0", "aug1", "aug2", "aug3", "aug4", "aug5"]
    clock = Clock(5000.0)
    # aug0 finished in an earlier session (run.json: 90 s); aug1 exited 0 after 110 s
    # here, aug5 failed; aug2 runs (heartbeat), aug3 starts (a previous session's
    # heartbeat); aug4 waits.
    os.makedirs(os.path.join(out, "runs", "aug0"))
    jsonio.write_json(os.path.join(out, "runs", "aug0", "run.json"), {"wall_time_s": 90.0})
    for name in ("aug2", "aug3"):
        os.makedirs(os.path.join(out, "runs", name))
    for name, beat in (("aug2", _beat(222, 50, 250, 2.5, 4998.0)),
                       ("aug3", _beat(111, 10, 250, 1.0, 4000.0, "finetune"))):  # fmt: skip
        Workdir(os.path.join(out, "runs", name)).write_heartbeat(beat)
    p = study_progress.StudyProgress(out, names, ["aug0"], 2, every_s=30, clock=clock)
    running = {"aug2": (4900.0, 222), "aug3": (4990.0, 333)}
    exited = {"aug1": (0, 110.0), "aug5": (1, 5.0)}
    state = p.state(["aug4"], running, exited, clock())
    # aug2: 200 steps at 2.5/s - 2 s = 78 s; aug3: 110 - 10 = 100 s; aug4 after aug2: 188 s
    assert state["eta_s"] == pytest.approx(188.0)
    assert study_progress.format_line(state) == (
        "study: 2/6 runs done, 2 running, 1 left, 1 failed | ETA 3m08s | "
        "aug2 pretrain step 50/250 (2.50 steps/s), aug3 starting"
    )
    # a branch that could not run (its baseline failed) is skipped, not failed
    skipped = dict(exited, aug4=("skipped: baseline aug1 failed", 0.0))
    assert study_progress.format_line(p.state([], running, skipped, clock())).startswith(
        "study: 2/6 runs done, 2 running, 0 left, 1 failed, 1 skipped | ETA 1m40s"
    )
    with caplog.at_level(logging.INFO, logger="jaxrepro"):
        for t in (5010.0, 5029.0, 5031.0, 5040.0, 5062.0):
            clock.t = t
            p(["aug4"], running, exited)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(x.startswith("study: 2/6 runs done") for x in lines)
    # nothing finished in this session: the earlier session's run.json (90 s)
    fresh = study_progress.StudyProgress(out, names, ["aug0"], 1, every_s=30, clock=clock)
    assert fresh.state(["aug4", "aug5"], {}, {}, clock())["eta_s"] == pytest.approx(180.0)

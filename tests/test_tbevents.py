"""TensorBoard event files: what a run writes is what the project's reader and
TensorBoard's own EventAccumulator read back, also across a resume."""

from __future__ import annotations

import os

import pytest
from helpers import accumulator, check_event_files, tiny_digits

from jaxrepro import dropoff, tbevents
from jaxrepro.compare import readers
from jaxrepro.errors import ConfigError
from jaxrepro.train import loop
from jaxrepro.workdir import Workdir

# Detector thresholds that flag every rise of the loss (drop-offs to write as text); the
# detector does not touch training, so the rows and hashes are the tiny run's own.
SENSITIVE = {
    "dropoff.loss.window": 3,
    "dropoff.loss.min_history": 1,
    "dropoff.loss.z_threshold": 1e-6,
    "dropoff.loss.min_ratio": 1.0,
    "dropoff.loss.transient_steps": 0,
    "dropoff.loss.mad_floor": 1e-6,
    "dropoff.loss.refractory": 0,
    "dropoff.accuracy.min_drop": 1e-6,
}


@pytest.fixture(scope="module")
def resumed(data_dir, tmp_path_factory):
    """A tiny run stopped after step 10 (its last checkpoint: 8), then resumed."""
    path = str(tmp_path_factory.mktemp("tb") / "run")
    config = tiny_digits(data_dir, **SENSITIVE)
    loop.run(config, path, stop_after=11)
    first = tbevents.event_files(path)
    info = loop.run(tiny_digits(data_dir, **SENSITIVE), path)
    return path, first, info


def test_resumed_run_event_files_read_back_exactly_without_duplicates(resumed):
    path, first, info = resumed
    assert info["status"] == "done" and info["resumes"][0]["from_step"] == 8
    files = tbevents.event_files(path)
    assert len(first) == 1 and len(files) == 2 and files[0] == first[0]
    # The first session wrote steps 8-10 too: without the purge both readers would
    # see them twice (or keep the first session's), so this also checks the purge.
    first_steps = {r["step"] for r in readers.read_tensorboard(first)}
    assert max(first_steps) >= 10
    result = check_event_files(path)
    tags = result["acc"].Tags()["scalars"]
    for tag in ("pretrain/train/loss", "finetune/train/grad_norm", "pretrain/train/lr"):
        assert tag in tags
    assert "finetune/eval/target_test/accuracy" in tags


def test_dropoffs_are_text_events_at_their_onsets(resumed):
    path, *_ = resumed
    events = dropoff.load_dropoffs(path)
    assert len(events) >= 2
    acc = accumulator(path)
    texts = acc.Tensors(tbevents.DROPOFF_TAG)
    assert [t.step for t in texts] == [e["step"] for e in events]
    for t, e in zip(texts, events, strict=True):
        text = t.tensor_proto.string_val[0].decode()
        assert text == tbevents.dropoff_text(e) and f"at step {e['step']}" in text


def test_purge_drops_the_re_executed_steps_of_older_files(tmp_path):
    """A session that starts at step 3 replaces every older point at 3 and after."""
    workdir = str(tmp_path)

    def row(step, loss):
        return {"kind": "train", "step": step, "phase": "pretrain", "loss": loss}

    first = tbevents.EventWriter(workdir, 0)
    for s in range(6):
        first.add_row(row(s, 1.0 + s))
    first.close()
    second = tbevents.EventWriter(workdir, 3)
    assert not second.backfill
    second.add_row(row(3, 0.25))
    second.close()
    want = {0: 1.0, 1: 2.0, 2: 3.0, 3: 0.25}  # steps 4 and 5 are not re-run yet
    got = readers.read_tensorboard(tbevents.event_files(workdir))
    assert {r["step"]: r["loss"] for r in got} == want
    points = accumulator(workdir).Scalars("pretrain/train/loss")
    assert {p.step: p.value for p in points} == want and len(points) == 4


def test_tensorboard_off_writes_no_event_files(data_dir, tmp_path):
    path = str(tmp_path / "run")
    loop.run(tiny_digits(data_dir, **{"runtime.tensorboard": False}), path, stop_after=2)
    assert not os.path.exists(tbevents.tb_dir(path))
    assert Workdir(path).metrics()


@pytest.mark.parametrize(
    "field, value",
    [("heartbeat_every_s", 0.0), ("progress_every_s", -1.0), ("tensorboard", "yes")],
)
def test_runtime_fields_are_validated(data_dir, field, value):
    import ml_collections

    from jaxrepro import config as config_lib

    config = tiny_digits(data_dir)
    runtime = config.runtime.to_dict()
    runtime[field] = value  # a section as a config file could build it
    with config.unlocked():
        config.runtime = ml_collections.ConfigDict(runtime)
    with pytest.raises(ConfigError, match=f"runtime.{field}"):
        config_lib.validate(config)

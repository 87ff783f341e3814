"""Diagnosis by intervention, on tiny runs with planted causes of both kinds.

* Batch-driven: the examples of the batch at pretrain step ``AT`` have corrupted labels
  (wherever they are read). Skipping that batch or redrawing the order removes the loss
  spike; other augmentation draws keep it.
* Augmentation-driven: a test-only augmentation turns one example's image pathological
  (non-finite) for one draw of its key (that example, that epoch, a key whose test uniform
  falls under a small threshold), under the 'skip' policy. Other augmentation draws remove
  the event; skipping an unrelated, earlier batch keeps it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import snapshot, tiny_digits

from jaxrepro import dropoff as dropoff_lib
from jaxrepro import rng
from jaxrepro.data import augment as augment_lib
from jaxrepro.data import sources as sources_lib
from jaxrepro.diagnose import engine
from jaxrepro.diagnose import verdict as verdict_lib
from jaxrepro.errors import CheckpointError, ConfigError, WorkdirError
from jaxrepro.train import loop
from jaxrepro.train import programs as programs_lib
from jaxrepro.train.setup import RunSetup

AT = 80  # the planted event's step: the model has learned by then (~65% accuracy)
OVERRIDES = {
    "pretrain.steps": 100,
    "pretrain.batch_size": 32,
    "finetune.steps": 0,
    "pretrain.eval_every": 20,
    "checkpoint.every": 10,
    "checkpoint.keep_last": 20,
    "diagnose.after": 8,
    # This tiny model's loss is still noisy and falling: a spike here is >= 2x its level.
    "dropoff.loss.min_ratio": 2.0,
    "dropoff.loss.z_threshold": 3.0,
}


def _config(data_dir):
    return tiny_digits(data_dir, **OVERRIDES)


def _planted_event(run: str) -> int:
    events = dropoff_lib.load_dropoffs(run)
    near = [i for i, e in enumerate(events) if e["metric"] == "loss" and e["step"] == AT]
    assert near, f"no loss episode at the planted step {AT}: {events}"
    return near[0]


# ----------------------------------------------------------------------------- batch-driven


@pytest.fixture(scope="module")
def batch_run(data_dir, tmp_path_factory):
    config = _config(data_dir)
    setup = RunSetup(config)
    bad = {int(i) for i in setup.batch_ids(setup.phases[0], AT)[0]}
    real = sources_lib.Source.get

    def corrupted(self, ids):
        images, labels = real(self, ids)
        if self.split == "train" and self.name == "digits":
            labels = np.array(labels)
            hit = np.isin(np.asarray(ids), list(bad))
            labels[hit] = (labels[hit] + 5) % 10
        return images, labels

    path = str(tmp_path_factory.mktemp("batch") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources_lib.Source, "get", corrupted)  # data: not part of the program
        mp.setenv("JAXREPRO_PROGRAM_CACHE", "1")  # the run keeps its train step
        info = loop.run(config, path)
    assert info["programs"] == {"train_pretrain": "compiled"}
    return path, corrupted


def test_batch_driven_event_is_tied_to_the_batch(batch_run, monkeypatch):
    path, corrupted = batch_run
    monkeypatch.setattr(sources_lib.Source, "get", corrupted)  # the same data as the run
    index = _planted_event(path)
    built = []  # the train step made ready (loaded from the program cache, or compiled)
    job = programs_lib.Programs.train_job
    monkeypatch.setattr(
        programs_lib.Programs, "train_job", lambda *a: (built.append(1), job(*a))[1]
    )
    monkeypatch.setenv("JAXREPRO_PROGRAM_CACHE", "1")
    (d,) = engine.diagnose(path, dropoff=index, arms="exact,aug:4,order:2,skip")
    # the run's own train step, loaded without a trace: the exact arm is bitwise all the same
    assert d["programs"] == {"train_pretrain": "loaded"}
    assert d["exact_bitwise"] is True and d["exact_first_difference"] is None
    assert len(built) == 1  # one compiled step for the phase, shared by all 8 arms
    fam = d["verdict"]["families"]
    assert fam["exact"]["recurred"] == 1 and fam["aug"]["recurred"] == 4
    assert fam["skip"]["recurred"] == 0 and fam["order"]["recurred"] == 0
    assert d["verdict"]["cause"] == verdict_lib.BATCH
    out = os.path.join(path, engine.DIR, d["name"])
    with open(os.path.join(out, "diagnosis.json")) as f:
        assert json.load(f)["verdict"]["cause"] == verdict_lib.BATCH
    assert os.path.getsize(os.path.join(out, "figure.png")) > 20000
    assert os.path.isfile(os.path.join(out, "figure.svg"))
    summary = open(os.path.join(out, "summary.md")).read()
    assert verdict_lib.BATCH in summary and "Wilson" in summary


def test_an_inverted_rule_gives_the_wrong_verdict(batch_run, monkeypatch):
    """The verdict follows the recurrence rule: inverted, the same arms (read back from
    disk, not run again) no longer say 'tied to the batch'."""
    path, corrupted = batch_run
    monkeypatch.setattr(sources_lib.Source, "get", corrupted)
    index = _planted_event(path)
    real = verdict_lib.recurs
    monkeypatch.setattr(
        verdict_lib, "recurs", lambda o, ev, w: None if real(o, ev, w) else {"step": o["step"]}
    )
    monkeypatch.setattr(
        engine.ArmRunner, "run", lambda *a, **k: pytest.fail("finished arms must be reused")
    )
    (d,) = engine.diagnose(path, dropoff=index, arms="exact,aug:4,order:2,skip")
    assert d["verdict"]["cause"] != verdict_lib.BATCH


def test_a_lower_learning_rate_is_reported_as_a_remedy_arm(batch_run, monkeypatch):
    path, corrupted = batch_run
    monkeypatch.setattr(sources_lib.Source, "get", corrupted)
    index = _planted_event(path)
    (d,) = engine.diagnose(path, dropoff=index, arms="exact,lr:0.5,clip:0.1")
    assert set(d["verdict"]["remedies"]) == {"lr", "clip"}
    lr_rows = [
        json.loads(line)
        for line in open(os.path.join(path, engine.DIR, d["name"], "arms", "lr0.5.jsonl"))
    ]
    train = [r for r in lr_rows if r["kind"] == "train"]
    assert train and all(r["lr"] == pytest.approx(0.5 * 3e-3) for r in train)


def test_diagnosis_reports_progress_as_blocks_are_read_and_stays_bitwise(
    batch_run, tmp_path, monkeypatch, caplog
):
    """One arm of 30 steps (70..100): its metrics are read in blocks (at the eval at 80,
    8 steps once 16 are in flight, the rest at the end), each read is a progress line, and
    the exact arm is still the run bit for bit."""
    path, corrupted = batch_run
    monkeypatch.setattr(sources_lib.Source, "get", corrupted)
    run = str(tmp_path / "run")
    shutil.copytree(path, run, ignore=shutil.ignore_patterns(engine.DIR))
    config_path = os.path.join(run, "config.json")
    with open(config_path) as f:
        stored = json.load(f)
    stored["runtime"].update(progress="lines", progress_every_s=1e-9)  # not the trajectory
    with open(config_path, "w") as f:
        json.dump(stored, f)
    index = _planted_event(run)
    with caplog.at_level(logging.INFO, logger="jaxrepro"):
        (d,) = engine.diagnose(run, dropoff=index, arms="exact", after=30)
    assert d["restore_step"] == 70 and d["until"] == 100 and d["exact_bitwise"] is True
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("diagnose ")]
    # the first read (at the eval at 80) anchors the rate; the later ones are lines
    assert [x.split(" | ")[0] for x in lines] == [
        f"diagnose {index}: step 18/30 (arm exact, step 88/100)",
        f"diagnose {index}: step 30/30 (arm exact, step 100/100)",
    ]


# ----------------------------------------------------------------------------- aug-driven


def _pathological(target_id: int, target_epoch: int, threshold: float):
    real = augment_lib.augment_batch

    def poisoned(root, images, epochs, ids, cfg):
        out = real(root, images, epochs, ids, cfg)
        keys = rng.example_keys(root, epochs, ids)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 7)))(keys)
        bad = (ids == target_id) & (epochs == target_epoch) & (u < threshold)
        return jnp.where(bad[:, None, None, None], jnp.nan, out)

    return poisoned


@pytest.fixture(scope="module")
def aug_run(data_dir, tmp_path_factory):
    config = _config(data_dir)
    config.train.nonfinite_policy = "skip"  # the run goes on past the pathological step
    setup = RunSetup(config)
    phase = setup.phases[0]
    ids, epochs = setup.batch_ids(phase, AT)
    root = setup.keys(phase)[0]
    keys = rng.example_keys(root, jnp.asarray(epochs), jnp.asarray(ids))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 7)))(keys))
    pick = int(np.argmin(u))  # the example whose draw is rarest: a threshold just above it
    poisoned = _pathological(int(ids[pick]), int(epochs[pick]), float(u[pick]) + 1e-6)
    path = str(tmp_path_factory.mktemp("aug") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(augment_lib, "augment_batch", poisoned)
        loop.run(config, path)
    return path, poisoned


def test_augmentation_driven_event_is_tied_to_the_draw(aug_run, monkeypatch):
    path, poisoned = aug_run
    monkeypatch.setattr(augment_lib, "augment_batch", poisoned)
    index = _planted_event(path)
    (d,) = engine.diagnose(path, dropoff=index, arms="exact,aug:4,skip:-3")
    assert d["exact_bitwise"] is True
    fam = d["verdict"]["families"]
    assert fam["aug"]["recurred"] <= 1 and fam["skip"]["recurred"] == 1
    assert d["verdict"]["cause"] == verdict_lib.AUG


# ----------------------------------------------------------------------------- bad input


def test_bad_diagnoses_are_refused_before_any_work(batch_run, tmp_path):
    path, _ = batch_run
    before = snapshot(path)
    with pytest.raises(ConfigError, match="count >= 1"):
        engine.diagnose(path, dropoff=0, arms="aug:0")
    with pytest.raises(WorkdirError, match=r"valid: 0\.\."):
        engine.diagnose(path, dropoff=99)
    with pytest.raises(ConfigError, match="before drop-off"):
        engine.diagnose(path, dropoff=_planted_event(path), arms="skip:-30")
    with pytest.raises(WorkdirError, match="not a jaxrepro run"):
        engine.diagnose(str(tmp_path / "nothing"))
    assert snapshot(path) == before


def test_a_run_without_a_checkpoint_before_the_onset_names_the_nearest(data_dir, tmp_path):
    event = {"step": 3, "phase": "pretrain", "metric": "loss", "kind": "spike"}
    with pytest.raises(CheckpointError, match="nearest is 5"):
        engine.restore_step(event, [5, 10], _config(data_dir))

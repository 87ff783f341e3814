"""Replay from a checkpoint, non-finite policies, retention around drop-offs."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import spy, tiny_digits

from jaxrepro import dropoff as dropoff_lib
from jaxrepro import replay as replay_lib
from jaxrepro import trajectory
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.data import augment as augment_lib
from jaxrepro.errors import CheckpointError, ConfigError, WorkdirError
from jaxrepro.train import loop
from jaxrepro.train import record as record_lib
from jaxrepro.train.setup import RunSetup
from jaxrepro.workdir import Workdir


@pytest.fixture(scope="module")
def original(data_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("orig") / "run")
    info = loop.run(tiny_digits(data_dir, **{"checkpoint.keep_last": 10}), path)
    return path, info


def test_exact_replay_is_bitwise(original, monkeypatch):
    path, info = original
    calls = spy(monkeypatch, trajectory, "compare")  # the replay's verdict is trajectory.compare's
    s = replay_lib.replay(path, from_step=4)
    assert calls == [{"start": 4, "until": None}]
    assert s["kind"] == "exact" and s["from_step"] == 4 and s["status"] == "done"
    assert s["compared_rows"] >= 10 and s["missing_rows"] == [] and s["extra_rows"] == []
    # every row of the original from step 4 on came back
    assert s["compared_rows"] == len([r for r in Workdir(path).metrics() if r["step"] >= 4])
    assert s["bitwise_equal"] and s["first_difference"] is None
    assert all(e["equal"] for e in s["steps"])
    assert s["final_param_hash"] == info["final_param_hash"]
    assert os.path.isfile(os.path.join(s["replay_dir"], "replay_summary.json"))
    assert os.path.getsize(s["figure"]) > 5000
    # the original's checkpoints were only read
    assert Checkpoints(os.path.join(path, "checkpoints"), read_only=True).steps() == [
        0,
        4,
        8,
        12,
        14,
    ]


def test_counterfactual_aug_seed_differs_only_after_restore(original):
    path, info = original
    s = replay_lib.replay(path, from_step=8, overrides=["seeds.aug=7"], name="aug7")
    assert s["kind"] == "counterfactual" and s["overrides"] == ["seeds.aug=7"]
    rows = s["steps"]
    at_restore = [r for r in rows if r["step"] == 8 and r["kind"] == "eval"]
    after = [r for r in rows if r["kind"] == "train"]
    assert at_restore and all(r["equal"] for r in at_restore)  # the same state at step 8
    assert after and not any(r["equal"] for r in after)  # other augmentation from then on
    assert s["first_difference"]["step"] == 8 and s["first_difference"]["kind"] == "train"
    assert s["final_param_hash"] != info["final_param_hash"]
    # its rows before the restore step are the original's: the branch holds none of its own
    replay_rows = Workdir(s["replay_dir"]).metrics()
    assert min(r["step"] for r in replay_rows) == 8


def test_skip_batches_and_lr_override_branch(original):
    path, _ = original
    s = replay_lib.replay(path, from_step=4, skip_batches=3, steps=3)
    assert s["skip_batches"] == 3 and s["until"] == 7 and not s["bitwise_equal"]
    s2 = replay_lib.replay(path, from_step=4, overrides=["optimizer.lr=1e-5"], steps=2)
    assert s2["kind"] == "counterfactual" and not s2["bitwise_equal"]


def test_bad_replay_inputs_write_nothing(original, tmp_path, data_dir):
    path, _ = original
    before = sorted(os.listdir(os.path.join(path, "replays")))
    with pytest.raises(ConfigError, match="unknown config key"):
        replay_lib.replay(path, from_step=4, overrides=["optimizer.lerning_rate=1"])
    with pytest.raises(ConfigError, match="key=value"):
        replay_lib.replay(path, from_step=4, overrides=["seeds.aug"])
    with pytest.raises(ConfigError, match="architecture"):
        replay_lib.replay(path, from_step=4, overrides=["model.width=16"])
    events = dropoff_lib.load_dropoffs(path)
    with pytest.raises(WorkdirError, match="does not exist|no recorded drop-offs"):
        replay_lib.replay(path, dropoff=len(events) + 3)
    with pytest.raises(ConfigError, match="exactly one"):
        replay_lib.replay(path)
    assert sorted(os.listdir(os.path.join(path, "replays"))) == before
    bare = str(tmp_path / "bare")
    loop.run(tiny_digits(data_dir, **{"pretrain.steps": 2, "finetune.steps": 1}), bare)
    shutil.rmtree(os.path.join(bare, "checkpoints"))
    with pytest.raises(CheckpointError, match="no checkpoints"):
        replay_lib.replay(bare, from_step=0)
    with pytest.raises(WorkdirError, match="not a jaxrepro run"):
        replay_lib.replay(str(tmp_path / "nothing"), from_step=0)
    assert not os.path.exists(os.path.join(bare, "replays"))


def _poison(monkeypatch, example_id):
    """Makes the loss non-finite exactly when ``example_id`` leads a batch."""
    real = augment_lib.augment_batch

    def poisoned(root, images, epochs, ids, cfg):
        out = real(root, images, epochs, ids, cfg)
        return out * jnp.where(ids[0] == example_id, jnp.nan, 1.0)

    monkeypatch.setattr(augment_lib, "augment_batch", poisoned)


def _first_id(config, path, step):
    runner = RunSetup(config)
    phase = runner.phase_of(step)
    return int(runner.batch(phase, step)["id"][0])


@pytest.mark.parametrize("fetch_block", [1, 8])  # 8: read at the evals and saves only
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_policies(policy, fetch_block, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(record_lib, "FETCH_BLOCK", fetch_block)
    k = 6
    # One case logs every 4th step only: a stop's row (step 6) is written all the same.
    log_every = 4 if (policy, fetch_block) == ("stop", 1) else 1
    config = tiny_digits(
        data_dir,
        **{
            "train.nonfinite_policy": policy,
            "checkpoint.keep_last": 1,
            "pretrain.log_every": log_every,
        },
    )
    probe = str(tmp_path / "probe")
    os.makedirs(probe)
    bad_id = _first_id(config, probe, k)
    _poison(monkeypatch, bad_id)
    path = str(tmp_path / policy)
    info = loop.run(config, path)
    rows = Workdir(path).metrics()
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert train[k]["finite"] is False and train[k].get("skipped") is True
    # the update of step k was not applied: params after k == params after k-1
    if log_every == 1:
        assert train[k]["param_norm"] == train[k - 1]["param_norm"]
    events = dropoff_lib.load_dropoffs(path)
    assert any(e["kind"] == "nonfinite" and e["step"] == k for e in events)
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), read_only=True)
    assert 4 in ckpts.steps()  # the checkpoint before the event survives keep_last=1
    if policy == "skip":
        assert info["status"] == "done" and info["nonfinite_steps"] == 1
        assert all(r["finite"] for s, r in train.items() if s != k)
        assert max(train) == 13
    else:
        assert info["status"] == "diverged"
        # the record ends at the first non-finite step, however late the host read it
        assert max(train) == k and info["step"] == k + 1 and info["nonfinite_steps"] == 1
        assert not [r for r in rows if r["step"] > k]  # no eval or row after the stop
        assert ckpts.latest_step() <= k


def test_retention_keeps_the_checkpoint_before_each_event(tmp_path):
    ckpts = Checkpoints(str(tmp_path / "c"))
    state = {"w": np.arange(4.0, dtype=np.float32)}
    for step in range(0, 60, 10):
        ckpts.save(step, state, {"phase": "pretrain", "model": "x"})
        ckpts.wait()
    from jaxrepro.checkpoints import protected_steps

    protected = protected_steps(ckpts.steps(), [25, 31])
    assert protected == {20, 30}
    deleted = ckpts.retain(keep_last=1, keep_every=0, protected=protected)
    assert ckpts.steps() == [20, 30, 50] and sorted(deleted) == [0, 10, 40]
    ckpts.close()

"""The engine end to end at test size: determinism, factor isolation, the workdir."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import rows_equal, tiny_digits

from jaxrepro.data import augment as augment_lib
from jaxrepro.plumbing import hashing, jsonio
from jaxrepro.plumbing.gcfreeze import frozen_gc
from jaxrepro.train import loop
from jaxrepro.train import record as record_lib
from jaxrepro.train.evaluation import Evaluator
from jaxrepro.train.setup import RunSetup
from jaxrepro.workdir import Workdir


def _run(config, path):
    info = loop.run(config, str(path))
    return info, Workdir(str(path)).metrics()


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    info, rows = _run(tiny_digits(data_dir), path)
    return path, info, rows


def test_run_writes_the_workdir_layout(base_run):
    path, info, rows = base_run
    for name in ("config.json", "run.json", "metrics.jsonl", "dropoffs.json", "checkpoints"):
        assert os.path.exists(path / name), name
    assert info["status"] == "done"
    assert info["step"] == 14 and info["total_steps"] == 14
    assert set(info["seeds"]) == {"init", "head", "data", "aug", "dropout"}
    for key in ("platform", "libraries", "code", "init_param_hash", "final_param_hash"):
        assert info[key], key
    assert info["platform"]["cpu_threads"] >= 1
    assert info["platform"]["prng_impl"] == "threefry2x32"
    assert info["platform"]["threefry_partitionable"] is True
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(14))
    assert [r["phase"] for r in train] == ["pretrain"] * 8 + ["finetune"] * 6
    for r in train:
        for k in ("loss", "accuracy", "grad_norm", "update_norm", "param_norm", "lr"):
            assert np.isfinite(r[k]), (k, r)
    evals = [(r["step"], r["phase"], r["split"]) for r in rows if r["kind"] == "eval"]
    # evals at each phase's start, every eval_every steps, and at each phase's end
    assert (0, "pretrain", "source_test") in evals
    assert (8, "pretrain", "source_test") in evals and (8, "finetune", "target_test") in evals
    assert (14, "finetune", "target_test") in evals
    assert info["input_stats"]["pretrain"]["batches"] == 8
    # digits_shifted is inverted: its inputs are far from pretraining's, and we say so
    assert any("far from pretraining" in w for w in info["warnings"])


def test_same_config_twice_is_bitwise_identical(base_run, data_dir, tmp_path, monkeypatch):
    import gc

    _, info, rows = base_run
    frozen = []  # the step loop keeps what exists out of full collections (plumbing.gcfreeze)
    evaluate = Evaluator.evaluate
    monkeypatch.setattr(
        Evaluator, "evaluate", lambda *a: (frozen.append(gc.get_freeze_count()), evaluate(*a))[1]
    )
    # The second run reads its steps' metrics one at a time once two are in flight (the
    # tiny run never has 2 x 8 in flight): rows and hashes do not depend on the block.
    monkeypatch.setattr(record_lib, "FETCH_BLOCK", 1)
    blocks = []
    flush = record_lib.Record.flush
    monkeypatch.setattr(
        record_lib.Record, "flush", lambda r, n=None: (blocks.append(n), flush(r, n))
    )
    info2, rows2 = _run(tiny_digits(data_dir), tmp_path / "again")
    assert 1 in blocks  # the in-loop read of the oldest step was taken
    assert rows_equal(rows, rows2)
    assert info2["final_param_hash"] == info["final_param_hash"]
    assert info2["final_state_hash"] == info["final_state_hash"]
    assert frozen and min(frozen) > 0 and gc.get_freeze_count() == 0


def test_frozen_gc_unfreezes_on_error():
    import gc

    with pytest.raises(RuntimeError), frozen_gc():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a failing run")
    assert gc.get_freeze_count() == 0


def _runner(config, path):
    return RunSetup(config)


def _fed(runner, phase_name, step):
    """The example ids and augmented pixels the engine feeds at a global step."""
    phase = next(p for p in runner.phases if p.name == phase_name)
    batch = runner.batch(phase, step)
    aug_root, _ = runner.keys(phase)
    pixels = augment_lib.augment_batch(
        aug_root, batch["image"], batch["epoch"], batch["id"], runner.config.data.augment
    )
    return batch["id"], np.asarray(pixels)


@pytest.mark.parametrize("factor", ["init", "data", "aug"])
def test_each_factor_seed_changes_only_what_it_touches(factor, data_dir, tmp_path):
    base = _runner(tiny_digits(data_dir), tmp_path / "a")
    other = _runner(tiny_digits(data_dir, **{f"seeds.{factor}": 1}), tmp_path / "b")
    init_same = base.init_state().params, other.init_state().params
    same_init = hashing.tree_hash(init_same[0]) == hashing.tree_hash(init_same[1])
    assert same_init == (factor != "init")
    for phase, step in (("pretrain", 0), ("pretrain", 5), ("finetune", 9)):
        ids_a, px_a = _fed(base, phase, step)
        ids_b, px_b = _fed(other, phase, step)
        assert np.array_equal(ids_a, ids_b) == (factor != "data")
        if factor == "init":
            assert np.array_equal(px_a, px_b)
        if factor == "aug":
            assert not np.array_equal(px_a, px_b)
    if factor == "data":
        # the same example in the same epoch gets the same augmentation whatever the order
        phase = base.phases[0]
        ids, epochs = np.arange(16), np.zeros(16, np.int64)
        imgs, _ = base.data.source_train.get(ids)
        pa = augment_lib.augment_batch(
            base.keys(phase)[0], imgs, epochs, ids, base.config.data.augment
        )
        pb = augment_lib.augment_batch(
            other.keys(phase)[0], imgs, epochs, ids, other.config.data.augment
        )
        assert np.array_equal(np.asarray(pa), np.asarray(pb))


def test_aug_seed_run_shares_init_and_differs_in_training(base_run, data_dir, tmp_path):
    _, info, rows = base_run
    info2, rows2 = _run(tiny_digits(data_dir, **{"seeds.aug": 1}), tmp_path / "aug1")
    assert info2["init_param_hash"] == info["init_param_hash"]
    assert info2["seeds"]["aug"] == 1 and info2["seeds"]["data"] == info["seeds"]["data"]
    first = [r for r in rows if r["kind"] == "train"][0]
    first2 = [r for r in rows2 if r["kind"] == "train"][0]
    assert first["loss"] != first2["loss"]  # step 0 already sees other augmented pixels
    assert info2["final_param_hash"] != info["final_param_hash"]


def test_head_seed_changes_only_the_finetune_phase(base_run, data_dir, tmp_path):
    _, info, rows = base_run
    info2, rows2 = _run(tiny_digits(data_dir, **{"seeds.head": 5}), tmp_path / "head5")
    assert info2["init_param_hash"] == info["init_param_hash"]

    def phase_rows(rs, phase):
        return [r for r in rs if r["phase"] == phase]

    assert rows_equal(phase_rows(rows, "pretrain"), phase_rows(rows2, "pretrain"))
    ft, ft2 = phase_rows(rows, "finetune"), phase_rows(rows2, "finetune")
    assert not rows_equal(ft, ft2)
    assert ft[0]["kind"] == "eval" and ft[0]["step"] == 8  # the new head, before training
    assert ft[0]["loss"] != ft2[0]["loss"]


def test_same_config_resumes_and_does_not_overwrite(base_run, data_dir):
    path, info, _ = base_run
    before = {n: (path / n).read_bytes() for n in ("config.json", "metrics.jsonl", "run.json")}
    again = loop.run(tiny_digits(data_dir), str(path))
    assert again["status"] == "done"
    for n, content in before.items():
        assert (path / n).read_bytes() == content, f"{n} was rewritten"


def test_config_json_is_the_resolved_config(base_run):
    path, _, _ = base_run
    stored = json.loads((path / "config.json").read_text())
    assert stored["model"]["name"] == "resnet_tiny"
    assert stored["pretrain"]["steps"] == 8
    assert jsonio.read_json(str(path / "config.json")) == stored

"""End to end on stock TFDS datasets (mock data: no download, no TensorFlow)."""

from __future__ import annotations

import pytest
from helpers import load

from jaxrepro.data import testing as data_testing
from jaxrepro.train import loop
from jaxrepro.workdir import Workdir


@pytest.mark.parametrize("name", ["cifar", "imagenet"])
def test_smoke_config_trains_on_mock_data(name, data_dir, tmp_path):
    config = load(name, "smoke", data_dir, **{"runtime.progress_every_s": 1e9})
    with data_testing.mock_tfds(num_examples=48):
        info = loop.run(config, str(tmp_path / name))
    assert info["status"] == "done"
    rows = Workdir(str(tmp_path / name)).metrics()
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(info["total_steps"]))
    assert {r["phase"] for r in train} == {"pretrain", "finetune"}
    # a new head of the target's label set: source and target differ in classes
    assert info["phases"]["pretrain"]["num_classes"] != info["phases"]["finetune"]["num_classes"]
    evals = {(r["phase"], r["split"]) for r in rows if r["kind"] == "eval"}
    assert ("pretrain", "source_test") in evals and ("finetune", "target_test") in evals
    assert all(r["finite"] for r in train)

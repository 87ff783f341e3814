"""Stock configs: end to end on mock TFDS data through the worker pipeline; preparing."""

from __future__ import annotations

import os

import pytest
from helpers import load, snapshot

from jaxrepro import data as jdata
from jaxrepro.data import sources
from jaxrepro.data import testing as data_testing
from jaxrepro.errors import DataError
from jaxrepro.train import loop
from jaxrepro.workdir import Workdir


@pytest.mark.parametrize(
    "name, source, target",
    [("cifar", "cifar100", "svhn_cropped"), ("imagenet", "imagenet2012", "eurosat/rgb")],
)
def test_smoke_config_trains_on_mock_data_through_a_worker(
    name, source, target, data_dir, tmp_path
):
    # Mock splits are small enough to hold in memory: max_in_memory_mb=0 makes them read
    # as the real ones are (decoded ahead of the step by a worker process).
    overrides = {
        "runtime.progress_every_s": 1e9,
        "runtime.data_workers": 1,
        "runtime.max_in_memory_mb": 0,
    }
    config = load(name, "smoke", data_dir, **overrides)
    assert (config.data.source.name, config.data.target.name) == (source, target)
    with data_testing.mock_tfds(num_examples=48):
        info = loop.run(config, str(tmp_path / name))
    assert info["status"] == "done"
    assert info["data_pipeline"]["workers"] == 1
    assert info["data_pipeline"]["lazy_train_splits"] == ["pretrain", "finetune"]
    assert info["data_wait"]["steps"] == info["total_steps"] - 1  # the first is the start
    rows = Workdir(str(tmp_path / name)).metrics()
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(info["total_steps"]))
    assert {r["phase"] for r in train} == {"pretrain", "finetune"}
    # a new head of the target's label set: source and target differ in classes
    assert info["phases"]["pretrain"]["num_classes"] != info["phases"]["finetune"]["num_classes"]
    evals = {(r["phase"], r["split"]) for r in rows if r["kind"] == "eval"}
    assert ("pretrain", "source_test") in evals and ("finetune", "target_test") in evals
    assert all(r["finite"] for r in train)


def test_preparing_imagenet_explains_the_manual_download_before_writing(tmp_path):
    before = snapshot(str(tmp_path))
    with pytest.raises(DataError, match=r"image-net\.org.*ILSVRC2012_img_train\.tar") as error:
        jdata.prepare("imagenet2012", str(tmp_path / "tfds"))
    assert str(tmp_path / "tfds" / "downloads" / "manual") in str(error.value)
    assert snapshot(str(tmp_path)) == before and not os.path.exists(tmp_path / "tfds")


def test_prepare_into_a_full_data_dir_fails_before_writing(tmp_path, monkeypatch):
    real = sources.shutil.disk_usage
    monkeypatch.setattr(
        sources.shutil, "disk_usage", lambda path: real(path)._replace(free=10 << 20)
    )
    with pytest.raises(DataError, match=r"0\.01 GiB free.*need about 0\.1 GiB"):
        jdata.prepare("photos_small", str(tmp_path / "tfds"))
    assert os.listdir(tmp_path) == []


def test_prepare_into_a_read_only_data_dir_fails_before_writing(tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    if os.geteuid() == 0:  # root ignores permission bits: answer as for any other user
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if str(p) == str(read_only) else real(p, mode)
        )
    try:
        with pytest.raises(DataError, match="is not writable"):
            jdata.prepare("photos_small", str(read_only / "tfds"))
        with pytest.raises(DataError, match="is not writable"):  # training builds it too
            jdata.load("digits", "train", data_dir=str(read_only))
        assert os.listdir(read_only) == []
    finally:
        os.chmod(read_only, 0o755)


def test_a_prepared_split_with_the_wrong_count_is_refused(data_dir, monkeypatch):
    jdata.prepare("photos_small", data_dir)
    src = jdata.load("photos_small", "test", data_dir=data_dir, image_size=16)
    assert len(src) == 16
    wrong = sources.StockDataset({"train": 48, "test": 17}, 0.1)
    monkeypatch.setitem(sources.STOCK, "photos_small", wrong)
    with pytest.raises(
        DataError, match=r"split 'test' has 16 examples where TFDS's catalog has 17"
    ):
        jdata.load("photos_small", "test", data_dir=data_dir, image_size=16)

"""The host pipeline: batches decoded by worker processes, bitwise those of the order."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import load, set_dotted

from jaxrepro import config as config_lib
from jaxrepro import rng
from jaxrepro.data import order, photos, pipeline, sources
from jaxrepro.errors import ConfigError

BATCH = 8
IMAGE_SIZE = 24
CORRUPT_GENERATION_IDS = (3, 17)  # generation indices whose JPEG bytes are cut short


class PhotosCorrupt(photos.PhotosSmall):
    """photos_small (40 train examples) with two records whose JPEG is truncated."""

    SIZES = {"train": 40, "test": 8}

    def _generate_examples(self, split):
        for key, example in super()._generate_examples(split):
            if split == "train" and key in CORRUPT_GENERATION_IDS:
                example = dict(example, image=example["image"][: len(example["image"]) // 3])
            yield key, example


@pytest.fixture(scope="module")
def corrupt_dir(data_dir):
    """The data dir with photos_corrupt built, and the record ids of its corrupt examples."""
    builder = PhotosCorrupt(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    raw = tfds.data_source(
        "photos_corrupt",
        split="train",
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    bad = sorted(i for i in range(len(raw)) if raw[i]["id"] in CORRUPT_GENERATION_IDS)
    assert len(bad) == len(CORRUPT_GENERATION_IDS)
    return data_dir, bad


def _plan(reader, steps):
    key = order.host_key(rng.factor_root("data", 0))
    return pipeline.Plan(key, "drop", (pipeline.Segment("pretrain", 0, steps, BATCH, reader),))


def _batches(plan, steps, **kw):
    with pipeline.Prefetcher(plan, steps, **kw) as prefetcher:
        return [prefetcher.get(int(s)) for s in steps]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a.keys() - {"decode_cpu_s", "ready_at"}:  # measurements
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_are_the_same_with_0_and_2_workers_and_after_a_restart(corrupt_dir):
    """Two epochs (5 steps each) of a JPEG split with two corrupt records skipped."""
    data_dir, bad = corrupt_dir
    src = sources.load(
        "photos_corrupt",
        "train",
        data_dir=data_dir,
        image_size=IMAGE_SIZE,
        on_corrupt="skip",
        max_in_memory_bytes=0,
    )
    assert not src.in_memory and len(src) == 40
    plan = _plan(src.reader, 10)
    steps = np.arange(10)
    reference = _batches(plan, steps, workers=0, prefetch=1)
    for step, batch in zip(steps, reference, strict=True):
        ids, epochs = order.batch_ids(plan.data_key, "pretrain", step, BATCH, 40)
        np.testing.assert_array_equal(batch["id"], ids)  # the project's order, unchanged
        np.testing.assert_array_equal(batch["epoch"], epochs)
        images, labels = src.get(ids)  # the in-process path decodes the same pixels
        np.testing.assert_array_equal(batch["image"], images)
        np.testing.assert_array_equal(batch["label"], labels)
        assert set(batch["corrupt"]) == set(ids) & set(bad)
    # Each corrupt record's slot holds the next decodable record of the split.
    for index in bad:
        step, row = next(
            (s, list(b["id"]).index(index)) for s, b in enumerate(reference) if index in b["id"]
        )
        np.testing.assert_array_equal(
            reference[step]["image"][row], src.reader.example(index + 1)[0]
        )
    assert sorted(src.corrupt) == bad
    # Two workers and a deeper queue, restarted mid-epoch (step 7 of 10; epochs are 5 steps).
    # (One worker: tests/test_resume.py trains with one and resumes with none, bitwise.)
    restarted = _batches(plan, steps[7:], workers=2, prefetch=3)
    for batch, other in zip(reference[7:], restarted, strict=True):
        _assert_same(batch, other)


def test_a_corrupt_record_names_record_and_split_through_a_worker(corrupt_dir):
    data_dir, bad = corrupt_dir
    src = sources.load(
        "photos_corrupt", "train", data_dir=data_dir, image_size=IMAGE_SIZE, max_in_memory_bytes=0
    )
    message = rf"dataset 'photos_corrupt' split 'train': record {bad[0]} cannot be decoded"
    with pytest.raises(sources.CorruptRecordError, match=message):
        src.get(np.array([bad[0]]))
    plan = _plan(src.reader, 10)
    step_of = {}  # each record's first step
    for s in range(10):
        for i in plan.global_ids(s)[0]:
            step_of.setdefault(int(i), s)
    first = min(bad, key=step_of.get)  # the corrupt record the pipeline meets first
    step = step_of[first]
    with pipeline.Prefetcher(plan, np.arange(10), workers=1, prefetch=2) as prefetcher:
        for s in range(step):
            prefetcher.get(s)
        with pytest.raises(sources.CorruptRecordError, match=rf"split 'train': record {first} "):
            prefetcher.get(step)
    with pytest.raises(sources.CorruptRecordError, match="on_corrupt='skip'"):
        sources.load("photos_corrupt", "train", data_dir=data_dir, image_size=IMAGE_SIZE)


def test_a_sigkilled_worker_is_reported_not_waited_for(data_dir):
    src = sources.load(
        "photos_small", "train", data_dir=data_dir, image_size=IMAGE_SIZE, max_in_memory_bytes=0
    )
    steps = np.arange(24)
    prefetcher = pipeline.Prefetcher(_plan(src.reader, 24), steps, workers=1, prefetch=1)
    try:
        prefetcher.get(0)
        workers = [p for p in multiprocessing.active_children() if "grain" in p.name]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(pipeline.DataWorkerError, match="killed by SIGKILL") as error:
            for step in steps[1:]:  # at most the few batches already buffered come first
                prefetcher.get(int(step))
        assert "exit code -9" in str(error.value) and "preparing the batch of step" in str(
            error.value
        )
        assert time.monotonic() - t0 < 30
    finally:
        prefetcher.close()


def test_prefetcher_refuses_steps_out_of_order(data_dir):
    src = sources.load("photos_small", "test", data_dir=data_dir, image_size=IMAGE_SIZE)
    with pipeline.Prefetcher(_plan(src.reader, 2), [0, 1], workers=0, prefetch=1) as p:
        with pytest.raises(RuntimeError, match="next step is 0"):
            p.get(1)
    with pytest.raises(ValueError, match="increasing"):
        pipeline.Prefetcher(_plan(src.reader, 2), [1, 0], workers=0, prefetch=1)


def test_pipeline_config_fields_are_validated():
    for field, value, message in [
        ("runtime.data_workers", -1, "must be >= 0"),
        ("runtime.data_workers", 1000, "too many"),
        ("runtime.data_prefetch", 0, "must be > 0"),
        ("runtime.max_in_memory_mb", -5, "must be >= 0"),
        ("data.on_corrupt", "ignore", "is not one of"),
    ]:
        config = load("digits", "smoke")
        set_dotted(config, field, value)
        with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
            config_lib.validate(config)
    # They are runtime fields, except on_corrupt and jpeg_draft (which change pixels).
    changed = load(
        "digits",
        "smoke",
        **{"runtime.data_workers": 4, "runtime.data_prefetch": 5, "data.jpeg_draft": True},
    )
    assert config_lib.diff(
        config_lib.to_dict(load("digits", "smoke")), config_lib.to_dict(changed)
    ) == ["data.jpeg_draft"]

"""jaxrepro.data: embedded TFDS datasets, stock datasets (mocked), order, augmentation."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrepro import data as jdata
from jaxrepro import rng
from jaxrepro.data import augment, embedded, order, sources
from jaxrepro.data import testing as data_testing
from jaxrepro.errors import DataError

SIZES = {("digits", "train"): 1400, ("digits", "test"): 397}
SIZES |= {("digits_shifted", "train"): 150, ("digits_shifted", "test"): 247}


@pytest.fixture(scope="module")
def built(data_dir):
    for name in embedded.EMBEDDED:
        jdata.ensure_prepared(name, data_dir)
    return data_dir


def _all(src):
    return src.get(np.arange(len(src)))


# --- embedded datasets -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split"), sorted(SIZES))
def test_embedded_sizes_and_values(built, name, split):
    src = jdata.load(name, split, data_dir=built)
    images, labels = _all(src)
    assert len(src) == SIZES[(name, split)]
    assert src.num_classes == 10 and src.image_shape == (32, 32, 3) and src.in_memory
    assert images.dtype == np.uint8 and images.shape == (len(src), 32, 32, 3)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == set(range(10))
    assert (images == images[..., :1]).all()  # grey: 3 equal channels
    blocks = images[..., 0].reshape(len(src), 8, 4, 8, 4)
    constant_blocks = (blocks == blocks[:, :, :1, :, :1]).all()
    # Nearest upsampling gives constant 4x4 blocks; the shift's noise is per pixel.
    assert constant_blocks == (name == "digits")


def test_digits_values_are_scaled_sklearn_levels(built):
    images, _ = _all(jdata.load("digits", "train", data_dir=built))
    levels = np.round(np.arange(17) / 16 * 255).astype(np.uint8)
    assert set(np.unique(images)) <= set(levels)


def test_shifted_train_has_15_per_class(built):
    _, labels = _all(jdata.load("digits_shifted", "train", data_dir=built))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 15))


def test_stored_examples_equal_the_generated_ones(built):
    """Read back through tfds.data_source: every stored image is its generated one."""
    for name, arrays_fn in [
        ("digits", embedded.digits_arrays),
        ("digits_shifted", embedded.digits_shifted_arrays),
    ]:
        for split in ("train", "test"):
            images, labels, ids = arrays_fn(split)
            by_id = {int(i): row for row, i in enumerate(ids)}
            source = tfds.data_source(name, split=split, data_dir=built, download=False)
            assert len(source) == len(ids)
            for example in source:
                row = by_id.pop(int(example["id"]))
                np.testing.assert_array_equal(example["image"], images[row])
                assert example["label"] == labels[row]
            assert not by_id


def test_splits_are_disjoint_and_shifted_comes_from_test():
    train_ids, test_ids = embedded.digits_arrays("train")[2], embedded.digits_arrays("test")[2]
    assert not set(train_ids) & set(test_ids) and len({*train_ids, *test_ids}) == 1797
    shifted = {
        *embedded.digits_shifted_arrays("train")[2],
        *embedded.digits_shifted_arrays("test")[2],
    }
    assert shifted == set(test_ids)


def test_shift_is_rotated_inverted_noise():
    images, _, ids = embedded.digits_arrays("test")
    shifted, _, shifted_ids = embedded.digits_shifted_arrays("test")
    row_of = {int(i): row for row, i in enumerate(ids)}
    original = images[[row_of[int(i)] for i in shifted_ids]]
    expected = 1.0 - np.rot90(original[..., 0] / 255.0, k=1, axes=(1, 2))
    residual = shifted[..., 0] / 255.0 - expected
    inner = (expected > 0.3) & (expected < 0.7)  # where clipping cannot bias the noise
    assert abs(residual.mean()) < 0.02
    assert 0.09 < residual[inner].std() < 0.11
    unrotated = shifted[..., 0] / 255.0 - (1.0 - original[..., 0] / 255.0)
    assert np.abs(unrotated).mean() > 2 * np.abs(residual).mean()


def test_two_builds_give_identical_arrays_in_identical_order(built, tmp_path):
    for name in embedded.EMBEDDED:
        jdata.prepare(name, str(tmp_path))
        for split in ("train", "test"):
            first = _all(jdata.load(name, split, data_dir=built))
            second = _all(jdata.load(name, split, data_dir=str(tmp_path)))
            np.testing.assert_array_equal(first[0], second[0])
            np.testing.assert_array_equal(first[1], second[1])


def test_lazy_decoding_equals_in_memory(built):
    eager = jdata.load("digits_shifted", "test", data_dir=built)
    lazy = jdata.load("digits_shifted", "test", data_dir=built, max_in_memory_bytes=0)
    assert eager.in_memory and not lazy.in_memory
    ids = np.array([5, 0, 246, 5, 17])
    for a, b in zip(eager.get(ids), lazy.get(ids), strict=True):
        np.testing.assert_array_equal(a, b)


def test_get_rejects_bad_ids(built):
    src = jdata.load("digits_shifted", "train", data_dir=built)
    with pytest.raises(IndexError, match="out of range"):
        src.get(np.array([0, 150]))
    with pytest.raises(ValueError, match="1-D integer"):
        src.get(np.array([[0, 1]]))
    with pytest.raises(DataError, match="split 'validation'"):
        jdata.load("digits", "validation", data_dir=built)


# --- data dir, names, stock datasets -----------------------------------------------------


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.ENV_DATA_DIR, str(tmp_path / "env"))
    assert jdata.resolve_data_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    assert jdata.resolve_data_dir(None) == str(tmp_path / "env")
    monkeypatch.delenv(sources.ENV_DATA_DIR)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jdata.resolve_data_dir("") == str(tmp_path / "tensorflow_datasets")
    assert jdata.resolve_data_dir("gs://bucket/tfds") == "gs://bucket/tfds"


def test_unknown_dataset_is_named(tmp_path):
    assert issubclass(jdata.UnknownDatasetError, DataError)
    assert issubclass(jdata.DatasetNotPreparedError, DataError)
    with pytest.raises(jdata.UnknownDatasetError, match="'cifar1O'.*cifar10"):
        jdata.load("cifar1O", "train", data_dir=str(tmp_path))
    with pytest.raises(jdata.UnknownDatasetError, match="no_such_set"):
        jdata.prepare("no_such_set", str(tmp_path))
    assert jdata.check_name("imagenette/320px-v2:1.0.0") == "imagenette"


def test_unprepared_stock_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(jdata.DatasetNotPreparedError, match="jaxrepro prepare --dataset=cifar10"):
        jdata.load("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(jdata.DatasetNotPreparedError, match="manual"):
        jdata.ensure_prepared("imagenet2012", str(tmp_path))


def test_preparing_a_stock_dataset_needs_tensorflow(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: preparing would download")
    with pytest.raises(DataError, match=r"tensorflow.*jaxrepro\[tf\]"):
        jdata.prepare("cifar10", str(tmp_path))


def test_mock_cifar10_through_load(tmp_path):
    with data_testing.mock_tfds(num_examples=24):
        src = jdata.load("cifar10", "train", data_dir=str(tmp_path))
        again = jdata.load("cifar10", "train", data_dir=str(tmp_path))
        lazy = jdata.load("cifar10", "train", data_dir=str(tmp_path), max_in_memory_bytes=0)
    assert len(src) == 24 and src.num_classes == 10 and src.image_shape == (32, 32, 3)
    images, labels = _all(src)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10 and images.std() > 10
    for other in (again, lazy):
        np.testing.assert_array_equal(_all(other)[0], images)
        np.testing.assert_array_equal(_all(other)[1], labels)


def test_mock_grayscale_and_variable_size_datasets(tmp_path):
    with data_testing.mock_tfds(num_examples=6):
        mnist = jdata.load("mnist", "test", data_dir=str(tmp_path))
        mnist32 = jdata.load("mnist", "test", data_dir=str(tmp_path), image_size=32)
        with pytest.raises(ValueError, match="varying size"):
            jdata.load("imagenette", "train", data_dir=str(tmp_path))
        nette = jdata.load("imagenette", "train", data_dir=str(tmp_path), image_size=24)
    images = _all(mnist)[0]
    assert mnist.image_shape == (28, 28, 3) and (images == images[..., :1]).all()
    assert _all(mnist32)[0].shape == (6, 32, 32, 3)
    assert _all(nette)[0].shape == (6, 24, 24, 3)


def test_to_rgb_resizes_shorter_side_then_centre_crops():
    image = np.zeros((40, 80), np.uint8)
    image[:, 20:60] = 200  # the centre half of the width is bright
    out = sources.to_rgb(image, 20)  # -> 20 x 40, then the central 20 columns
    assert out.shape == (20, 20, 3) and (out == out[..., :1]).all()
    assert (out[:, 2:-2] == 200).all()
    np.testing.assert_array_equal(sources.to_rgb(np.full((8, 8, 3), 7, np.uint8), 8), 7)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        sources.to_rgb(np.zeros((4, 4, 2), np.uint8))


# --- order ---------------------------------------------------------------------------------


def _root(seed):
    return rng.factor_root("data", seed)


def _epoch_ids(root, n, b, remainder, steps, phase="pretrain"):
    rows = [order.batch_ids(root, phase, s, b, n, remainder) for s in range(steps)]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def test_drop_epochs_are_permutation_prefixes():
    ids, epochs = _epoch_ids(_root(0), n=10, b=3, remainder="drop", steps=6)
    assert jdata.steps_per_epoch(10, 3, "drop") == 3
    np.testing.assert_array_equal(epochs, np.repeat([0, 1], 9))
    for e in (0, 1):
        perm = order.permutation(_root(0), "pretrain", e, 10)
        assert sorted(perm) == list(range(10))
        np.testing.assert_array_equal(ids[epochs == e], perm[:9])
    assert not np.array_equal(ids[:9], ids[9:])  # each epoch its own order


def test_stream_uses_every_example_and_straddles_epochs():
    ids, epochs = _epoch_ids(_root(0), n=10, b=4, remainder="stream", steps=5)
    np.testing.assert_array_equal(epochs, np.repeat([0, 1], 10))
    for e in (0, 1):
        assert sorted(ids[epochs == e]) == list(range(10))
    _, straddling = order.batch_ids(_root(0), "pretrain", 2, 4, 10, "stream")
    np.testing.assert_array_equal(straddling, [0, 0, 1, 1])
    # Until the first partial batch, both policies read the same ids.
    drop_ids, _ = _epoch_ids(_root(0), n=10, b=4, remainder="drop", steps=2)
    np.testing.assert_array_equal(drop_ids, ids[:8])


def test_order_depends_on_root_and_phase_and_is_pure():
    first = order.batch_ids(_root(0), "pretrain", 7, 5, 50)
    order._permutation.cache_clear()
    np.testing.assert_array_equal(first[0], order.batch_ids(_root(0), "pretrain", 7, 5, 50)[0])
    assert not np.array_equal(first[0], order.batch_ids(_root(1), "pretrain", 7, 5, 50)[0])
    assert not np.array_equal(first[0], order.batch_ids(_root(0), "finetune", 7, 5, 50)[0])
    # the loop's host copy of the key gives the same order
    key = order.host_key(_root(0))
    assert order.host_key(key) is key
    order._permutation.cache_clear()
    for mode in ("drop", "stream"):
        for step in (0, 7, 23):
            want = order.batch_ids(_root(0), "pretrain", step, 5, 50, mode)
            got = order.batch_ids(key, "pretrain", step, 5, 50, mode)
            np.testing.assert_array_equal(want[0], got[0])
            np.testing.assert_array_equal(want[1], got[1])


def test_step_to_epoch_mapping_and_step_counts():
    for step, epoch in [(0, 0), (42, 0), (43, 1), (128, 2), (129, 3)]:
        _, epochs = order.batch_ids(_root(0), "pretrain", step, 32, 1400)
        assert (epochs == epoch).all()
    assert jdata.num_steps(1400, 32, 3) == 129  # the default study's pretraining length
    assert jdata.num_steps(10, 4, 3, "stream") == 8
    assert jdata.steps_per_epoch(10, 4, "stream") == 3


def test_order_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 11 > num_examples 10"):
        order.batch_ids(_root(0), "pretrain", 0, 11, 10)
    with pytest.raises(ValueError, match="remainder"):
        order.steps_per_epoch(10, 2, "wrap")
    with pytest.raises(ValueError, match="phase"):
        order.batch_ids(_root(0), "warmup", 0, 2, 10)
    assert len(order.batch_ids(_root(0), "pretrain", 0, 11, 10, "stream")[0]) == 11


# Few distinct N: each new N compiles a permutation (~0.5 s); B and the policy vary freely.
@settings(max_examples=20, deadline=None)
@given(n=st.sampled_from([1, 7, 10, 33]), b=st.integers(1, 16), stream=st.booleans())
def test_every_epoch_is_a_permutation(n, b, stream):
    remainder = "stream" if stream else "drop"
    if not stream and b > n:
        return
    steps = 2 * n if stream else 2 * (n // b)  # at least two whole epochs
    ids, epochs = _epoch_ids(_root(3), n, b, remainder, steps)
    assert (np.diff(epochs) >= 0).all()
    for e in (0, 1):
        got = ids[epochs == e]
        assert len(set(got)) == len(got) == (n if stream else b * (n // b))


# --- augmentation --------------------------------------------------------------------------


def _cfg(**enabled):
    cfg = jdata.default_augment_config()
    for op in augment.OPS:
        cfg[op].enabled = enabled.get(op, False)
    cfg.brightness.max_delta, cfg.contrast.lower, cfg.contrast.upper = 0.2, 0.5, 1.5
    return cfg


def _images(batch=8, size=12, low=0, high=256):
    return jnp.asarray(
        np.random.default_rng(0).integers(low, high, (batch, size, size, 3)), jnp.uint8
    )


def _aug_root(seed=0):
    return rng.phase_root(rng.factor_root("aug", seed), "pretrain")


def _run(cfg, images, root=None, epochs=None, ids=None, fn=None):
    """Augments under jit, as the train step does (pass ``fn`` to reuse a compilation)."""
    batch = images.shape[0]
    epochs = jnp.zeros(batch, jnp.int32) if epochs is None else epochs
    ids = jnp.arange(batch) if ids is None else ids
    fn = fn or jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    return np.asarray(fn(_aug_root() if root is None else root, images, epochs, ids))


def test_augmentation_is_invariant_to_batch_size():
    cfg = _cfg(crop=True, flip=True, brightness=True, contrast=True)
    images, epochs, ids = _images(), jnp.array([0, 0, 1, 1, 2, 2, 3, 3]), jnp.arange(10, 18)
    fn = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    whole = _run(cfg, images, epochs=epochs, ids=ids, fn=fn)
    for size in (1, 2, 4):
        parts = [
            _run(
                cfg, images[i : i + size], epochs=epochs[i : i + size], ids=ids[i : i + size], fn=fn
            )
            for i in range(0, 8, size)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.dtype == np.float32 and whole.min() >= 0 and whole.max() <= 1


def test_augmentation_depends_on_root_only_through_keys():
    cfg = _cfg(crop=True, flip=True, brightness=True, contrast=True)
    images, fn = _images(), jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    base = _run(cfg, images, fn=fn)
    np.testing.assert_array_equal(base, _run(cfg, images, fn=fn))
    assert not np.array_equal(base, _run(cfg, images, root=_aug_root(1), fn=fn))
    later = _run(cfg, images, epochs=jnp.ones(8, jnp.int32), fn=fn)
    assert not np.array_equal(base, later)  # a new epoch draws anew


def test_disabled_ops_and_zero_padding_are_identity():
    images = _images()
    expected = np.asarray(augment.eval_preprocess(images))
    np.testing.assert_array_equal(_run(_cfg(), images), expected)
    no_pad = _cfg(crop=True)
    no_pad.crop.padding = 0
    np.testing.assert_array_equal(_run(no_pad, images), expected)


def test_flip_mirrors_or_keeps():
    images = _images(batch=16)
    x = np.asarray(augment.eval_preprocess(images))
    cfg = _cfg(flip=True)
    out = _run(cfg, images)
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x, strict=True)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    cfg.flip.prob = 1.0
    np.testing.assert_array_equal(_run(cfg, images), x[:, :, ::-1])


def _shift(image, dy, dx):
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    src = image[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    out[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)] = src
    return out


def test_crop_is_a_zero_filled_shift_and_independent_of_flip():
    images = _images(batch=16)
    x = np.asarray(augment.eval_preprocess(images))
    crop = _run(_cfg(crop=True), images)
    shifts = []
    for o, xi in zip(crop, x, strict=True):
        found = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if np.array_equal(o, _shift(xi, dy, dx))
        ]
        assert found
        shifts.append(found[0])
    assert len(set(shifts)) > 3
    both = _run(_cfg(crop=True, flip=True), images)
    for c, b in zip(crop, both, strict=True):  # flip's switch leaves crop's draws alone
        assert np.array_equal(b, c) or np.array_equal(b, c[:, ::-1])


def test_photometric_ops():
    images = _images(batch=16, low=80, high=176)  # mid-range: no clipping
    x = np.asarray(augment.eval_preprocess(images))
    bright = _run(_cfg(brightness=True), images) - x
    deltas = bright.reshape(16, -1)
    np.testing.assert_allclose(deltas, deltas[:, :1] * np.ones_like(deltas), atol=1e-6)
    assert np.abs(deltas[:, 0]).max() <= 0.2 and np.ptp(deltas[:, 0]) > 0.05
    contrast = _run(_cfg(contrast=True), images)
    np.testing.assert_allclose(contrast.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
    factors = contrast.std(axis=(1, 2)) / x.std(axis=(1, 2))
    np.testing.assert_allclose(factors, factors[:, :1] * np.ones_like(factors), rtol=1e-4)
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4 and np.ptp(factors) > 0.1


def test_augment_config_validation():
    for op, field, value, pattern in [
        ("crop", "padding", -1, "crop.padding"),
        ("flip", "prob", 1.5, "flip.prob"),
        ("brightness", "max_delta", -0.1, "max_delta"),
        ("contrast", "lower", 2.0, "contrast.lower"),
    ]:
        cfg = jdata.default_augment_config()
        cfg[op][field] = value
        with pytest.raises(ValueError, match=pattern):
            augment.validate_augment_config(cfg)
    cfg = jdata.default_augment_config()
    cfg.rotate = ml_collections.ConfigDict({"enabled": True})
    with pytest.raises(ValueError, match="rotate"):
        augment.validate_augment_config(cfg)
    with pytest.raises(ValueError, match="uint8"):
        cfg = jdata.default_augment_config()
        augment.augment_batch(_aug_root(), jnp.zeros((2, 4, 4, 3)), jnp.zeros(2), jnp.zeros(2), cfg)


def test_channel_stats():
    images = np.random.default_rng(1).random((5, 6, 7, 3)).astype(np.float32)
    mean, std = augment.channel_stats(jnp.asarray(images))
    np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, images.std(axis=(0, 1, 2)), rtol=1e-5)

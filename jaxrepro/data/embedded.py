"""The embedded offline datasets, as real TFDS builders: ``digits`` and ``digits_shifted``.

Both are made from scikit-learn's bundled ``load_digits()`` (1,797 real 8x8
handwritten digits, values 0..16), so they build in seconds with no download and
no TensorFlow, and read back through ``tfds.data_source`` like any stock dataset.

* ``digits``: scaled to [0, 1], upsampled 8 -> 32 (nearest), 3 identical channels,
  stored as uint8 32x32x3 (``round(255 * x)``). Split by a fixed permutation
  (``np.random.default_rng(SPLIT_SEED).permutation(1797)``): the first 1,400
  permuted examples are ``train``, the other 397 are ``test``.
* ``digits_shifted``: a fixed domain shift of the 397 held-out digits, in their
  ``test`` order: rotated 90 degrees counter-clockwise, inverted (``1 - x``), plus
  Gaussian noise of std 0.1 drawn once from ``np.random.default_rng(NOISE_SEED)``
  (one 32x32 noise plane per image, shared by the 3 channels so the image stays
  grey), clipped to [0, 1], stored as uint8. ``train`` holds the first 15 of each
  class in that order (150, for fine-tuning), ``test`` the other 247.

Features: ``image`` (``Tensor`` uint8 32x32x3: stored raw, read back bit-exact
without an image codec), ``label`` (``ClassLabel``, 10) and ``id`` (the index of
the digit in ``load_digits()``, for tracing an example back to its source).

TFDS stores examples in the order of a hash of their key, so the index in the
data source (the example id the engine uses) is not the generation order; it is
stable across builds, which the tests check.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SPLIT_SEED = 0  # the fixed train/test permutation of the 1,797 digits
NOISE_SEED = 1  # the fixed noise of digits_shifted
NUM_TRAIN = 1400
FINETUNE_PER_CLASS = 15
NOISE_STD = 0.1
IMAGE_SIZE = 32
NUM_CLASSES = 10
_UPSAMPLE = IMAGE_SIZE // 8


@functools.cache
def _base_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float64 [N, 32, 32] in [0, 1] and int labels [N]."""
    from sklearn.datasets import load_digits  # imported late: sklearn is slow to import

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    images = images.repeat(_UPSAMPLE, axis=1).repeat(_UPSAMPLE, axis=2)  # nearest upsampling
    return images, digits.target.astype(np.int64)


def _to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """[N, H, W] floats in [0, 1] -> uint8 [N, H, W, 3]."""
    quantised = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(quantised[..., None], 3, axis=-1)


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False  # cached and shared: nobody may edit them
    return arrays


@functools.cache
def digits_split_indices() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of each ``digits`` split (fixed permutation)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(_base_digits()[1]))
    train, test = _frozen(order[:NUM_TRAIN].copy(), order[NUM_TRAIN:].copy())
    return {"train": train, "test": test}


@functools.cache
def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N,32,32,3], labels [N], source ids [N]) of a ``digits`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits train and test, not {split!r}")
    images, labels = _base_digits()
    idx = digits_split_indices()[split]
    return _frozen(_to_uint8_rgb(images[idx]), labels[idx], idx.copy())


@functools.cache
def _shifted_all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shifted held-out digits, in ``digits`` test order, before the split."""
    images, labels = _base_digits()
    idx = digits_split_indices()["test"]
    shifted = 1.0 - np.rot90(images[idx], k=1, axes=(1, 2))
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, NOISE_STD, size=shifted.shape)
    return _to_uint8_rgb(shifted + noise), labels[idx], idx


@functools.cache
def shifted_split_mask() -> np.ndarray:
    """Boolean mask over the 397 shifted digits: True for the fine-tuning ``train`` split."""
    labels = _shifted_all()[1]
    mask = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members) <= FINETUNE_PER_CLASS:
            raise ValueError(f"class {c} has only {len(members)} held-out digits")
        mask[members[:FINETUNE_PER_CLASS]] = True
    return mask


def digits_shifted_arrays(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N,32,32,3], labels [N], source ids [N]) of a ``digits_shifted`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"digits_shifted has splits train and test, not {split!r}")
    images, labels, ids = _shifted_all()
    mask = shifted_split_mask() if split == "train" else ~shifted_split_mask()
    return images[mask], labels[mask], ids[mask]


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "id": tfds.features.Scalar(dtype=np.int64),
        }
    )


def _examples(arrays):
    images, labels, ids = arrays
    for image, label, source_id in zip(images, labels, ids, strict=True):
        # Keyed by the source index: unique, and fixes TFDS's hash-based order.
        yield int(source_id), {"image": image, "label": int(label), "id": int(source_id)}


# Bump a builder's VERSION whenever what it generates changes: a data dir that holds
# the old version would otherwise keep serving the old examples.


class Digits(tfds.core.GeneratorBasedBuilder):
    """sklearn digits, 32x32x3 uint8, 1,400 train / 397 test (fixed permutation)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # TFDS 4.9.10 derives code_path through `importlib_resources`, which it only
    # declares as a dependency for Python < 3.9; naming the file avoids that import.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs wants metadata files beside the code.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_features(),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        return _examples(digits_arrays(split))


class DigitsShifted(tfds.core.GeneratorBasedBuilder):
    """The 397 held-out digits rotated, inverted and noised: 150 train / 247 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)  # see Digits

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_features(),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        return _examples(digits_shifted_arrays(split))


# Registered TFDS names (snake case of the class names) -> builder classes.
EMBEDDED = {"digits": Digits, "digits_shifted": DigitsShifted}

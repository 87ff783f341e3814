"""Test helpers: stock TFDS datasets (e.g. cifar10) as mock data, offline, without TF.

Usage, e.g. in an engine end-to-end test::

    from jaxrepro.data import testing as data_testing

    with data_testing.mock_tfds(num_examples=64):
        src = jaxrepro.data.load("cifar10", "train", data_dir=data_dir)  # 64 examples
        ...  # train for a few steps on it

Inside the context, ``tfds.testing.mock_data`` with ``MockPolicy.USE_CODE`` is
active: every TFDS builder -- stock and embedded alike, so build the embedded
datasets outside it -- reads deterministic random examples (seeded by their
index) with the features of the builder's code: cifar10 gives uint8 32x32x3
images and labels in [0, 10). Every split has the same ``num_examples``
examples, and ``train`` and ``test`` hold the same ones. The data dir is ignored
and nothing is written. ``USE_FILES`` does not work offline here: TFDS ships no
metadata files for cifar10.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

MOCK_CIFAR10_CLASSES = 10
MOCK_CIFAR10_SHAPE = (32, 32, 3)


@contextlib.contextmanager
def mock_tfds(num_examples: int = 64) -> Iterator[None]:
    """Makes every TFDS dataset read ``num_examples`` mock examples per split.

    Args:
      num_examples: the length of every split inside the context.
    """
    if int(num_examples) < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, num_examples=int(num_examples)
    ):
        yield

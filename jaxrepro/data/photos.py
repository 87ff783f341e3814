"""JPEG datasets of photo crops, built offline as TFDS array_record: ``photos``, ``photos_small``.

Made from the two real photographs that scikit-learn ships (``china.jpg`` and
``flower.jpg``, 427x640, ``sklearn.datasets.load_sample_images``), so they build in
seconds with no download and no TensorFlow, and are read like any stock JPEG dataset
(the ``image`` feature holds encoded JPEG bytes; jaxrepro decodes them on the host).

Example ``i`` of a split is drawn from ``np.random.default_rng([SEED, split index, i])``:
one of the two photos, a crop of random height and width within the builder's range at
a random position, a left-right flip with probability 1/2, a per-channel gain
``U(0.8, 1.2)``, Gaussian noise of std ``NOISE_STD`` (one plane shared by the three
channels, so the image keeps its colours), clipped and rounded to uint8, optionally
downscaled (PIL bilinear) and encoded by PIL as JPEG of quality ``JPEG_QUALITY``.

* ``photos``: ImageNet-like: 375-427 x 450-560 pixels, about 100 KB a JPEG (the noise
  and quality were chosen to give ImageNet's typical file size), 512 ``train`` and 128
  ``test`` examples. Used by ``jaxrepro bench data``.
* ``photos_small``: the same recipe downscaled 8x (about 50 x 63 pixels, about 3 KB):
  48 ``train`` and 16 ``test`` examples, for tests of the JPEG path.

Labels are ``rng.integers(10)``: arbitrary classes (these datasets measure the input
pipeline, not accuracy). Features: ``image`` (``Image``, JPEG, variable size), ``label``
(``ClassLabel``, 10), ``id`` (the generation index, for tracing an example back).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

SEED = 2024
NOISE_STD = 2.5
JPEG_QUALITY = 95
NUM_CLASSES = 10
_SPLITS = ("train", "test")


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # imported late: sklearn is slow to import

    images = tuple(np.asarray(image, np.uint8) for image in load_sample_images().images)
    for image in images:
        image.flags.writeable = False
    return images


def make_example(split_index: int, index: int, heights, widths, downscale: int):
    """(JPEG bytes, label) of example ``index`` of split number ``split_index``. Pure."""
    rng = np.random.default_rng([SEED, split_index, index])
    photos = _photos()
    base = photos[int(rng.integers(len(photos)))]
    height = int(rng.integers(heights[0], heights[1] + 1))
    width = int(rng.integers(widths[0], widths[1] + 1))
    top = int(rng.integers(0, base.shape[0] - height + 1))
    left = int(rng.integers(0, base.shape[1] - width + 1))
    crop = base[top : top + height, left : left + width].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    crop = crop + rng.normal(0.0, NOISE_STD, size=(height, width, 1)).astype(np.float32)
    image = PIL.Image.fromarray(np.clip(np.round(crop), 0, 255).astype(np.uint8))
    if downscale > 1:
        image = image.resize((width // downscale, height // downscale), PIL.Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), int(rng.integers(NUM_CLASSES))


class _PhotoCrops(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common code of the photo-crop builders (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)  # see embedded.Digits
    HEIGHTS = (375, 427)
    WIDTHS = (450, 560)
    DOWNSCALE = 1
    SIZES = {"train": 512, "test": 128}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/loading_other_datasets.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the photos ship with scikit-learn
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split):
        split_index = _SPLITS.index(split)
        for index in range(self.SIZES[split]):
            jpeg, label = make_example(
                split_index, index, self.HEIGHTS, self.WIDTHS, self.DOWNSCALE
            )
            yield index, {"image": jpeg, "label": label, "id": index}


class Photos(_PhotoCrops):
    """ImageNet-like JPEGs (~400x500, ~100 KB) from scikit-learn's two photos: 512 / 128."""


class PhotosSmall(_PhotoCrops):
    """The photos recipe downscaled 8x (~50x63, ~3 KB JPEGs): 48 train / 16 test."""

    DOWNSCALE = 8
    SIZES = {"train": 48, "test": 16}


# Registered TFDS names (snake case of the class names) -> builder classes.
PHOTOS = {"photos": Photos, "photos_small": PhotosSmall}

"""Datasets by name, read through TFDS's random-access data sources (array_record).

``load(name, split)`` returns a :class:`Source`: ``len``, ``num_classes``,
``image_shape`` and ``get(ids) -> (images uint8, labels int32)``. Reading needs no
TensorFlow. Two kinds of dataset have the same interface:

* embedded (``digits``, ``digits_shifted``): built on first use into the data dir
  (seconds, offline);
* stock TFDS datasets (``cifar10``, ``mnist``, ``imagenette``, ``imagenet2012``, ...):
  prepared once by ``prepare(name)`` (needs TensorFlow and the network, or the
  manual archives for ImageNet); reading them afterwards needs neither.

Host-side decoding, fixed for determinism: grayscale is repeated to 3 channels;
when ``image_size`` is given and an image is not ``image_size`` square, it is
resized with PIL bilinear so its shorter side is ``image_size``, then centre
cropped. A split whose decoded images fit in ``max_in_memory_bytes`` (default
1 GiB; digits, CIFAR, MNIST) is decoded once at load into numpy; a larger one, or
one with variable image sizes, is decoded on demand in ``get`` by a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import fcntl
import importlib.util
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxrepro.data import embedded
from jaxrepro.errors import DataError

ENV_DATA_DIR = "JAXREPRO_DATA_DIR"
DEFAULT_MAX_IN_MEMORY_BYTES = 1 << 30
_CHUNK = 256  # examples per decode task


class UnknownDatasetError(DataError):
    """The dataset name is neither embedded nor a TFDS builder."""


class DatasetNotPreparedError(DataError):
    """A stock dataset has no array_record files in the data dir yet."""


def resolve_data_dir(config_value: str | None = None) -> str:
    """The TFDS data dir to use.

    Args:
      config_value: ``config.data_dir``; wins when set (non-empty).

    Returns:
      ``config_value``, else ``$JAXREPRO_DATA_DIR``, else ``~/tensorflow_datasets``;
      a local path made absolute (URLs such as ``gs://...`` are kept as they are).
    """
    value = config_value or os.environ.get(ENV_DATA_DIR) or "~/tensorflow_datasets"
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def check_name(name: str) -> str:
    """Validates a dataset name (``NAME[/CONFIG][:VERSION]``); returns the bare name.

    Raises:
      UnknownDatasetError: if it is neither embedded nor a registered TFDS builder.
    """
    base = name.split(":")[0].split("/")[0]
    if base in embedded.EMBEDDED:
        return base
    known = tfds.list_builders(with_community_datasets=False)  # offline: no GCS listing
    if base not in known:
        close = difflib.get_close_matches(base, [*embedded.EMBEDDED, *known], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: not embedded ({', '.join(embedded.EMBEDDED)}) "
            f"and not a TFDS builder{hint}"
        )
    return base


def _prepare_instructions(name: str, data_dir: str) -> str:
    text = (
        f"Prepare it once (needs TensorFlow and the network): pip install 'jaxrepro[tf]', then "
        f"`jaxrepro prepare --dataset={name} --data_dir={data_dir}`, or "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`."
    )
    if name.startswith("imagenet2012"):
        text += (
            " ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {data_dir}/downloads/manual (the manual_dir) first."
        )
    return text


@contextlib.contextmanager
def _quiet_progress():
    """Hides TFDS progress bars while building (a build takes seconds)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(before)


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
    """An exclusive file lock, so parallel runs (one per seed) build a dataset once."""
    if "://" in data_dir:  # remote file systems have no flock; build there beforehand
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".jaxrepro-{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _embedded_builder(name: str, data_dir: str):
    return embedded.EMBEDDED[name](data_dir=data_dir, file_format="array_record")


def ensure_prepared(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset; builds an embedded one on first use.

    Raises:
      UnknownDatasetError: unknown name.
      DatasetNotPreparedError: a stock dataset not prepared in ``data_dir``.
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in embedded.EMBEDDED:
        if not _embedded_builder(base, data_dir).is_prepared():
            with _build_lock(data_dir, base), _quiet_progress():
                builder = _embedded_builder(base, data_dir)
                if not builder.is_prepared():  # another process may have built it meanwhile
                    builder.download_and_prepare()
        return _embedded_builder(base, data_dir)  # a fresh builder reads the written info
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {data_dir}. "
            + _prepare_instructions(name, data_dir)
        )
    return builder


def _check_prepare_requirements(name: str) -> None:
    """Fails early, and clearly, where TFDS would fail deep inside a download."""
    # TFDS encodes images with TensorFlow when it writes them; and 4.9.10 imports
    # `importlib_resources` when it builds a stock dataset, though it declares that
    # dependency only for Python < 3.9.
    missing = [
        m for m in ("tensorflow", "importlib_resources") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise DataError(
            f"preparing the stock dataset {name!r} needs {' and '.join(missing)}: "
            "pip install 'jaxrepro[tf]' importlib_resources (reading it afterwards needs neither)"
        )


def prepare(name: str, data_dir: str | None = None, *, manual_dir: str | None = None) -> str:
    """Builds a dataset into ``data_dir`` in array_record format; returns its path.

    Embedded datasets build offline in seconds. Stock ones call TFDS's
    ``download_and_prepare(file_format='array_record')``, which needs TensorFlow
    (the ``tf`` extra) and the network, or, for ImageNet, the archives in
    ``manual_dir`` (default ``DATA_DIR/downloads/manual``).
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in embedded.EMBEDDED:
        return str(ensure_prepared(base, data_dir).data_dir)
    _check_prepare_requirements(name)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format="array_record", download_config=config)
    return str(builder.data_dir)


def _open_split(builder, name: str, split: str, data_dir: str):
    """``builder.as_data_source(split)``, with a clear error when nothing is prepared.

    The preparedness check only runs after a failure: under
    ``tfds.testing.mock_data`` a stock builder reads mock data while looking unprepared.
    """
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, FileNotFoundError) as error:
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"dataset {name!r} is not prepared in {data_dir}. "
                + _prepare_instructions(name, data_dir)
            ) from error
        if isinstance(error, NotImplementedError):  # prepared, but not as array_record
            raise DatasetNotPreparedError(
                f"dataset {name!r} in {builder.data_dir} has no array_record files (random "
                f"access needs them). Rebuild it with file_format=array_record. "
                + _prepare_instructions(name, data_dir)
            ) from error
        raise DataError(f"cannot read split {split!r} of dataset {name!r}: {error}") from error


def to_rgb(image: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """One decoded image -> uint8 [H, W, 3], optionally resized to ``image_size`` square.

    Grayscale is repeated to 3 channels. Resizing (only when the size differs):
    PIL bilinear so that the shorter side is ``image_size``, then a centre crop.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image with 1 or 3 channels, got {image.dtype}{list(image.shape)}"
        )
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = _resize_and_crop(image, image_size)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), PIL.Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = out[top : top + size, left : left + size]
    return out[..., None] if out.ndim == 2 else out


class Source:
    """Random access to one split: ``get(ids) -> (uint8 [B,H,W,3], int32 [B])``.

    An example's id is its index in the TFDS data source: stable for a prepared
    dataset, which is all the deterministic order needs.
    """

    def __init__(self, name, split, data_source, info, *, image_size, max_in_memory_bytes):
        image_key, label_key = info.supervised_keys or ("image", "label")
        self.name, self.split = name, split
        self.num_classes = int(info.features[label_key].num_classes)
        self._keys = (image_key, label_key)
        self._data_source = data_source
        self._size = len(data_source)
        self._image_size = image_size
        self.image_shape = _output_shape(info.features[image_key].shape, image_size, name)
        self._images = self._labels = self._pool = None
        if self._size * int(np.prod(self.image_shape)) <= max_in_memory_bytes:
            with _thread_pool() as pool:
                self._images, self._labels = self._decode(np.arange(self._size), pool)
        else:
            self._pool = _thread_pool()  # lives as long as the source

    @property
    def in_memory(self) -> bool:
        """Whether the split was decoded once at load (else ``get`` decodes)."""
        return self._images is not None

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {self.split!r}, n={self._size}, shape={self.image_shape})"

    def get(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [B, H, W, 3] and labels int32 [B] of examples ``ids``."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self._size):
            raise IndexError(f"ids out of range [0, {self._size}) for {self!r}")
        if self._images is not None:
            return self._images[ids], self._labels[ids]
        return self._decode(ids, self._pool)

    def _decode(self, ids: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        labels = np.empty(len(ids), np.int32)

        def decode_chunk(start: int) -> None:
            # One record at a time: tfds.testing.mock_data's __getitems__ is broken in 4.9.10.
            for row in range(start, min(start + _CHUNK, len(ids))):
                example = self._data_source[int(ids[row])]
                images[row] = to_rgb(example[self._keys[0]], self._image_size)
                labels[row] = int(example[self._keys[1]])

        # Each task writes its own rows, so the result does not depend on thread timing.
        list(pool.map(decode_chunk, range(0, len(ids), _CHUNK)))
        return images, labels


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    # Decoding (PIL, array_record reads) releases the GIL for most of its time.
    return concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))


def _output_shape(feature_shape, image_size: int | None, name: str) -> tuple[int, int, int]:
    height, width = feature_shape[:2]
    if image_size is not None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return (int(image_size), int(image_size), 3)
    if height is None or width is None:
        raise ValueError(f"dataset {name!r} has images of varying size: set image_size")
    return (int(height), int(width), 3)


def load(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
) -> Source:
    """Opens one split of a dataset for random access.

    Args:
      name: an embedded name (``digits``, ``digits_shifted``) or a TFDS builder name,
        optionally ``NAME/CONFIG:VERSION``.
      split: a TFDS split, e.g. ``'train'``, ``'test'``, ``'train[:90%]'``.
      data_dir: the TFDS data dir; ``None`` -> ``resolve_data_dir(None)``.
      image_size: if set, images are made ``image_size`` square (see module doc).
      max_in_memory_bytes: splits whose decoded images fit are decoded once at load.

    Raises:
      UnknownDatasetError, DatasetNotPreparedError: see their names; DataError: a bad
        split; ValueError: a bad image_size (all three are ValueErrors).
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in embedded.EMBEDDED:
        builder = ensure_prepared(base, data_dir)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    data_source = _open_split(builder, name, split, data_dir)
    return Source(
        name,
        split,
        data_source,
        builder.info,
        image_size=image_size,
        max_in_memory_bytes=max_in_memory_bytes,
    )

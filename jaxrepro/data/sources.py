"""Datasets by name, read through TFDS's random-access data sources (array_record).

``load(name, split)`` returns a :class:`Source`: ``len``, ``num_classes``,
``image_shape`` and ``get(ids) -> (images uint8, labels int32)``. Reading needs no
TensorFlow. Two kinds of dataset have the same interface:

* offline (``digits``, ``digits_shifted``, and the JPEG ``photos``, ``photos_small``):
  built on first use into the data dir (seconds, no download);
* stock TFDS datasets (``cifar10``, ``svhn_cropped``, ``eurosat``, ``imagenet2012``, ...):
  prepared once by ``prepare(name)`` (needs TensorFlow and the network, or the
  manual archives for ImageNet); reading them afterwards needs neither. A prepared
  split is checked when it is opened (:func:`check_split`).

Host-side decoding, fixed for determinism (:class:`Reader`, :class:`Decoding`): encoded
images are decoded by PIL (optionally in JPEG draft mode); grayscale is repeated to 3
channels; when ``image_size`` is given and an image is not ``image_size`` square, it is
resized with PIL bilinear so its shorter side is ``image_size``, then centre cropped. A
record that cannot be decoded stops the run, naming it, or is skipped where the config
says so. A split whose decoded images fit in ``max_in_memory_bytes`` (default 1 GiB;
digits, CIFAR, MNIST) is decoded once at load into numpy; a larger one, or one with
variable image sizes, is decoded on demand: in ``get`` by a thread pool, or ahead of the
training step by worker processes (``jaxrepro.data.pipeline``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import fcntl
import importlib.util
import io
import os
import shutil

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxrepro.data import embedded, photos
from jaxrepro.errors import DataError

ENV_DATA_DIR = "JAXREPRO_DATA_DIR"
DEFAULT_MAX_IN_MEMORY_BYTES = 1 << 30
_CHUNK = 256  # examples per decode task
# Built offline on first use (seconds): name -> TFDS builder class.
OFFLINE = {**embedded.EMBEDDED, **photos.PHOTOS}
_GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StockDataset:
    """What a prepared copy of a stock dataset must hold, and how to obtain it."""

    splits: dict  # split -> number of examples of the TFDS version jaxrepro's configs use
    disk_gib: float  # download + prepared array_record files, rounded up
    manual: str = ""  # how to obtain it where TFDS cannot download it


# The stock datasets of configs/cifar.py and configs/imagenet.py (and cifar10), checked at
# load and after `prepare`; counts from the TFDS catalog.
STOCK = {
    "cifar10": StockDataset({"train": 50_000, "test": 10_000}, 0.5),
    "cifar100": StockDataset({"train": 50_000, "test": 10_000}, 0.5),
    "svhn_cropped": StockDataset({"train": 73_257, "test": 26_032, "extra": 531_131}, 3.0),
    "eurosat": StockDataset({"train": 27_000}, 0.5),
    "imagenet2012": StockDataset(
        {"train": 1_281_167, "validation": 50_000, "test": 100_000},
        160.0,
        manual=(
            "ImageNet cannot be downloaded automatically: register at https://image-net.org, "
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and "
            "ILSVRC2012_img_test_v10102019.tar for the test split) and put them in "
            "{manual_dir}, then run the command again"
        ),
    ),
}


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
    if base in OFFLINE:
        return base
    known = tfds.list_builders(with_community_datasets=False)  # offline: no GCS listing
    if base not in known:
        close = difflib.get_close_matches(base, [*OFFLINE, *known], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: not built offline ({', '.join(OFFLINE)}) "
            f"and not a TFDS builder{hint}"
        )
    return base


def _manual_dir(data_dir: str, manual_dir: str | None = None) -> str:
    return manual_dir or os.path.join(data_dir, "downloads", "manual")


def manual_instructions(name: str, data_dir: str, manual_dir: str | None = None) -> str:
    """How to obtain a dataset TFDS cannot download ('' when it can)."""
    base = check_name(name)
    where = _manual_dir(data_dir, manual_dir)
    if base in STOCK and STOCK[base].manual:
        return STOCK[base].manual.format(manual_dir=where) + "."
    if base in OFFLINE:
        return ""
    text = getattr(tfds.builder_cls(base), "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if text:
        return f"{base} cannot be downloaded automatically; put its files in {where}: " + (
            " ".join(str(text).split())
        )
    return ""


def _prepare_instructions(name: str, data_dir: str) -> str:
    text = (
        f"Prepare it once (needs TensorFlow and the network): pip install 'jaxrepro[tf]', then "
        f"`jaxrepro prepare --dataset={name} --data_dir={data_dir}`, or "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`."
    )
    manual = manual_instructions(name, data_dir)
    return f"{text} {manual}" if manual else text


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_data_dir(data_dir: str, name: str) -> None:
    """Fails, before anything is written, where preparing ``name`` into ``data_dir`` cannot
    work: a data dir (or the folder it would be made in) that is not a writable directory,
    or with less free space than the dataset needs (:data:`STOCK`; 1 GiB where unknown)."""
    if "://" in data_dir:  # remote file systems: TFDS reports their errors itself
        return
    base = check_name(name)
    where = _existing_ancestor(data_dir)
    if not os.path.isdir(where):
        raise DataError(f"cannot prepare {name!r}: {where} (on the data dir's path) is a file")
    if not os.access(where, os.W_OK | os.X_OK) or os.statvfs(where).f_flag & os.ST_RDONLY:
        raise DataError(
            f"cannot prepare {name!r} in {data_dir}: {where} is not writable (read-only "
            "file system or no permission); choose another --data_dir (or $JAXREPRO_DATA_DIR)"
        )
    if base in OFFLINE:
        need, known = 0.1 * _GiB, True
    else:
        need, known = (STOCK[base].disk_gib * _GiB, True) if base in STOCK else (_GiB, False)
    free = shutil.disk_usage(where).free
    if free < need:
        size = f"about {need / _GiB:.1f} GiB" if known else "an unknown size (at least 1 GiB)"
        raise DataError(
            f"cannot prepare {name!r} in {data_dir}: {free / _GiB:.2f} GiB free on its file "
            f"system, and the download and array_record files need {size}; free space or "
            "choose another --data_dir"
        )


def check_split(builder, name: str, split: str, reader: Reader) -> None:
    """Checks a prepared split before training reads it: its example count (against the
    dataset's metadata and, for the stock datasets of :data:`STOCK`, the catalog count of
    the whole split) and that its first example decodes to the expected shape.

    Raises:
      DataError: naming the dataset, the split and what is wrong.
    """
    base = check_name(name)
    info = builder.info
    expected = int(info.splits[split].num_examples)
    problem = None
    if len(reader) != expected:
        problem = f"holds {len(reader)} examples, its metadata says {expected}"
    whole = split.split("[")[0]
    if problem is None and base in STOCK and whole in STOCK[base].splits:
        catalog, have = STOCK[base].splits[whole], int(info.splits[whole].num_examples)
        if have != catalog:
            problem = f"split {whole!r} has {have} examples where TFDS's catalog has {catalog}"
    if problem is None and len(reader):
        image, _ = reader.example(0)
        if image.shape != reader.image_shape:
            problem = f"example 0 decodes to {image.shape}, expected {reader.image_shape}"
    if problem:
        raise DataError(
            f"dataset {name!r} split {split!r} in {builder.data_dir} {problem}: the "
            "preparation is incomplete or of another version; prepare it again into an "
            "empty data dir. " + _prepare_instructions(name, os.path.dirname(builder.data_dir))
        )


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


def _offline_builder(name: str, data_dir: str):
    return OFFLINE[name](data_dir=data_dir, file_format="array_record")


def ensure_prepared(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset; builds an offline one on first use.

    Raises:
      UnknownDatasetError: unknown name.
      DatasetNotPreparedError: a stock dataset not prepared in ``data_dir``.
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in OFFLINE:
        if not _offline_builder(base, data_dir).is_prepared():
            check_data_dir(data_dir, base)  # before the lock file is written
            with _build_lock(data_dir, base), _quiet_progress():
                builder = _offline_builder(base, data_dir)
                if not builder.is_prepared():  # another process may have built it meanwhile
                    builder.download_and_prepare()
        return _offline_builder(base, data_dir)  # a fresh builder reads the written info
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
    """Builds a dataset into ``data_dir`` in array_record format, checks it; returns its path.

    Offline datasets build in seconds. Stock ones call TFDS's
    ``download_and_prepare(file_format='array_record')``, which needs TensorFlow
    (the ``tf`` extra) and the network, or, for ImageNet, the archives in
    ``manual_dir`` (default ``DATA_DIR/downloads/manual``). Before anything is written,
    the data dir must be writable with room for the dataset (:func:`check_data_dir`);
    afterwards every split is checked (:func:`check_split`).
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in OFFLINE:
        builder = ensure_prepared(base, data_dir)
    else:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            problems = []  # all of them at once: each may take the user a while to fix
            for check in (
                lambda: _check_manual_files(name, data_dir, manual_dir),
                lambda: check_data_dir(data_dir, name),
                lambda: _check_prepare_requirements(name),
            ):
                try:
                    check()
                except DataError as e:
                    problems.append(str(e))
            if len(problems) == 1:
                raise DataError(problems[0])
            if problems:
                raise DataError(" ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(file_format="array_record", download_config=config)
            builder = tfds.builder(name, data_dir=data_dir)  # reads the written info
    image_key = (builder.info.supervised_keys or ("image",))[0]
    varying = None in builder.info.features[image_key].shape[:2]
    decoding = Decoding(image_size=32 if varying else None)  # any size: it checks decoding
    for split in builder.info.splits:
        source = _open_split(builder, name, split, data_dir)
        check_split(builder, name, split, Reader(name, split, source, builder.info, decoding))
    return str(builder.data_dir)


def _check_manual_files(name: str, data_dir: str, manual_dir: str | None) -> None:
    """A dataset TFDS cannot download needs its files in the manual dir: say how, early."""
    manual = manual_instructions(name, data_dir, manual_dir)
    where = _manual_dir(data_dir, manual_dir)
    if manual and not (os.path.isdir(where) and os.listdir(where)):
        raise DataError(f"cannot prepare {name!r}: {where} is empty or missing. {manual}")


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


CORRUPT_POLICIES = ("error", "skip")


class CorruptRecordError(DataError):
    """A record whose example cannot be read or decoded; the message names dataset, split
    and record (its id, the index the example order uses)."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a split's records become images: part of the data config, since it sets pixels.

    ``image_size``: resize (see :func:`to_rgb`); ``jpeg_draft``: let libjpeg decode a JPEG
    at 1/2, 1/4 or 1/8 scale when that still leaves both sides >= ``image_size`` (faster,
    other pixels); ``on_corrupt``: ``'error'`` stops at a record that cannot be decoded,
    ``'skip'`` fills its place in a batch with the next decodable record of the split
    (id + 1, id + 2, ... wrapping), the same whoever decodes it, and counts it.
    """

    image_size: int | None = None
    jpeg_draft: bool = False
    on_corrupt: str = "error"

    def __post_init__(self):
        if self.on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(
                f"on_corrupt must be one of {', '.join(CORRUPT_POLICIES)}, got {self.on_corrupt!r}"
            )


def decoder_version() -> str:
    """The image decoder (its version sets the pixels of decoded JPEGs), for run.json."""
    from PIL import features

    return f"PIL {PIL.__version__}, libjpeg {features.version('jpg')}"


def decode_image(data: bytes, image_size: int | None, jpeg_draft: bool) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 1 or 3] with PIL (the one decoder, recorded)."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        if jpeg_draft and image_size is not None and image.format == "JPEG":
            image.draft("RGB", (image_size, image_size))  # sides stay >= image_size
        if image.mode not in ("L", "RGB"):  # CMYK JPEGs, palettes, alpha
            image = image.convert("RGB")
        array = np.asarray(image, np.uint8)
    return array[..., None] if array.ndim == 2 else array


class Reader:
    """Reads and decodes the examples of one split by id; picklable, so that worker
    processes read with the same code (and so the same pixels) as the training process.

    Images of TFDS ``Image`` features are decoded here with PIL, not by TFDS, which picks
    OpenCV where it is installed and PIL elsewhere (not always the same pixels); raw
    ``Tensor`` images are read as TFDS reads them.
    """

    def __init__(self, name: str, split: str, data_source, info, decoding: Decoding):
        image_key, label_key = info.supervised_keys or ("image", "label")
        self.name, self.split, self.decoding = name, split, decoding
        self.num_classes = int(info.features[label_key].num_classes)
        self.image_shape = _output_shape(info.features[image_key].shape, decoding.image_size, name)
        self._keys = (image_key, label_key)
        self._data_source = data_source
        self._features = info.features
        self._size = len(data_source)
        encoded = isinstance(info.features[image_key], tfds.features.Image)
        self._decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None

    def __len__(self) -> int:
        return self._size

    def _record(self, index: int) -> dict:
        record = self._data_source.data_source[index]
        if isinstance(record, dict):  # tfds.testing.mock_data hands out decoded examples
            return record
        return self._features.deserialize_example_np(record, decoders=self._decoders)

    def example(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 [H, W, 3], label) of record ``index``.

        Raises:
          CorruptRecordError: the record cannot be read or its image decoded.
        """
        try:
            example = self._record(index)
            image = example[self._keys[0]]
            if isinstance(image, bytes):
                image = decode_image(image, self.decoding.image_size, self.decoding.jpeg_draft)
            return to_rgb(image, self.decoding.image_size), int(example[self._keys[1]])
        except Exception as error:  # noqa: BLE001 - any failure of this record is named
            raise CorruptRecordError(
                f"dataset {self.name!r} split {self.split!r}: record {index} cannot be "
                f"decoded ({type(error).__name__}: {error}). Set data.on_corrupt='skip' to "
                "train without such records (they are counted in run.json)"
            ) from error

    def read_into(self, images, labels, rows, ids, corrupt: dict) -> None:
        """Decodes ``ids`` into ``images[rows]``/``labels[rows]``, applying ``on_corrupt``;
        adds each corrupt record met (id -> error) to ``corrupt``."""
        for row, index in zip(rows, ids, strict=True):
            images[row], labels[row] = self._example_or_substitute(int(index), corrupt)

    def read(self, ids) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """(images uint8 [B, H, W, 3], labels int32 [B], {corrupt id: error}) of ``ids``."""
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        labels = np.empty(len(ids), np.int32)
        corrupt = {}
        self.read_into(images, labels, range(len(ids)), ids, corrupt)
        return images, labels, corrupt

    def _example_or_substitute(self, index: int, corrupt: dict) -> tuple[np.ndarray, int]:
        try:
            return self.example(index)
        except CorruptRecordError as error:
            if self.decoding.on_corrupt != "skip":
                raise
            corrupt[index] = str(error.__cause__)
        for offset in range(1, self._size):
            other = (index + offset) % self._size
            try:
                return self.example(other)
            except CorruptRecordError as error:
                corrupt[other] = str(error.__cause__)
        raise CorruptRecordError(
            f"dataset {self.name!r} split {self.split!r}: no record can be decoded"
        )


class Source:
    """Random access to one split: ``get(ids) -> (uint8 [B,H,W,3], int32 [B])``.

    An example's id is its index in the TFDS data source: stable for a prepared
    dataset, which is all the deterministic order needs. ``corrupt`` collects the
    records met that could not be decoded (only with ``on_corrupt='skip'``).
    """

    def __init__(self, reader: Reader, *, max_in_memory_bytes: int):
        self.reader = reader
        self.name, self.split = reader.name, reader.split
        self.num_classes = reader.num_classes
        self.image_shape = reader.image_shape
        self._size = len(reader)
        self.corrupt: dict[int, str] = {}
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

    def check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self._size):
            raise IndexError(f"ids out of range [0, {self._size}) for {self!r}")
        return ids

    def get(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [B, H, W, 3] and labels int32 [B] of examples ``ids``."""
        ids = self.check_ids(ids)
        if self._images is not None:
            return self._images[ids], self._labels[ids]
        return self._decode(ids, self._pool)

    def _decode(self, ids: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        labels = np.empty(len(ids), np.int32)
        found = [{} for _ in range(0, len(ids), _CHUNK)]

        def decode_chunk(chunk: int) -> None:
            # One record at a time: tfds.testing.mock_data's __getitems__ is broken in 4.9.10.
            rows = range(chunk * _CHUNK, min((chunk + 1) * _CHUNK, len(ids)))
            self.reader.read_into(images, labels, rows, ids[rows.start : rows.stop], found[chunk])

        # Each task writes its own rows, so the result does not depend on thread timing.
        list(pool.map(decode_chunk, range(len(found))))
        for corrupt in found:
            self.corrupt.update(corrupt)
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
    jpeg_draft: bool = False,
    on_corrupt: str = "error",
) -> Source:
    """Opens one split of a dataset for random access.

    Args:
      name: an offline name (``digits``, ``digits_shifted``, ``photos``, ...) or a TFDS
        builder name, optionally ``NAME/CONFIG:VERSION``.
      split: a TFDS split, e.g. ``'train'``, ``'test'``, ``'train[:90%]'``.
      data_dir: the TFDS data dir; ``None`` -> ``resolve_data_dir(None)``.
      image_size: if set, images are made ``image_size`` square (see module doc).
      max_in_memory_bytes: splits whose decoded images fit are decoded once at load.
      jpeg_draft, on_corrupt: see :class:`Decoding`.

    Raises:
      UnknownDatasetError, DatasetNotPreparedError: see their names; DataError: a bad
        split, or a prepared split that fails its check (:func:`check_split`);
        CorruptRecordError: see :class:`Decoding`; ValueError: a bad image_size (all are
        ValueErrors).
    """
    data_dir = resolve_data_dir(data_dir)
    base = check_name(name)
    if base in OFFLINE:
        builder = ensure_prepared(base, data_dir)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    decoding = Decoding(image_size=image_size, jpeg_draft=jpeg_draft, on_corrupt=on_corrupt)
    data_source = _open_split(builder, name, split, data_dir)
    reader = Reader(name, split, data_source, builder.info, decoding)
    if builder.is_prepared():  # mock data (tests) looks unprepared and has no files to check
        check_split(builder, name, split, reader)
    return Source(reader, max_in_memory_bytes=max_in_memory_bytes)

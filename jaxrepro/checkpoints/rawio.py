"""Flat host arrays as raw files, written around the page cache: the packed checkpoint item.

A packed checkpoint (``checkpoints.py``) is one flat array per dtype, 269 MiB for the
digits ResNet-50 with its Adam moments. Written through orbax's tensorstore, or any
buffered write, the kernel copies those bytes into the page cache: 0.5-0.67 s of CPU a
save on this 2-core VM, taken from training (results/bench/NOTES.md, "Session 5").
``O_DIRECT`` hands the pages of an aligned buffer to the disk instead: 0.012 s of CPU
for the same 269 MiB. So this module writes each array to ``<name>.bin`` from a
page-aligned buffer, zero padded to a multiple of ``ALIGN`` bytes, with ``O_DIRECT``
where the OS and filesystem allow it and a buffered write (the same bytes) where they
do not (older tmpfs, some FUSE and network filesystems, macOS,
``JAXREPRO_DIRECT_IO=0``); then ``fsync``. Reads check the size and do the same. The
bytes' checksums are the checkpoint manifest's, checked on restore.

``RawArraysHandler`` is the orbax item handler: orbax keeps doing what it is good at
(step directories, atomic finalization, async commit, multi-host barriers); only the
bytes bypass it. Only the primary process writes (the packed state is replicated).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrepro.errors import CheckpointError

ALIGN = 4096  # bytes: the file size and buffer alignment (>= any block device's)
_CHUNK = 64 << 20  # bytes per write/read call
SUFFIX = ".bin"
INDEX = "arrays.json"  # {name: {"dtype", "count"}}: makes the item self-describing


def direct_io_enabled() -> bool:
    """``O_DIRECT`` unless the OS lacks it or ``JAXREPRO_DIRECT_IO=0``."""
    return hasattr(os, "O_DIRECT") and os.environ.get("JAXREPRO_DIRECT_IO", "1") != "0"


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def aligned_empty(count: int, dtype) -> np.ndarray:
    """A 1-D array of ``count`` items whose buffer starts on an ``ALIGN`` boundary and is
    followed by zeros up to the next boundary (``file_bytes`` of it is what is written)."""
    dtype = np.dtype(dtype)
    nbytes = count * dtype.itemsize
    raw = np.zeros(padded(nbytes) + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + padded(nbytes)][:nbytes].view(dtype)


def file_bytes(array: np.ndarray) -> memoryview:
    """The bytes of an ``aligned_empty`` array as written: its data and the zero padding."""
    base = array.base
    if (
        array.ndim != 1
        or not isinstance(base, np.ndarray)
        or base.dtype != np.uint8
        or base.ndim != 1
        or array.ctypes.data - base.ctypes.data + padded(array.nbytes) > base.nbytes
    ):
        raise ValueError("expected a 1-D array from aligned_empty")
    start = array.ctypes.data - base.ctypes.data
    return memoryview(base[start : start + padded(array.nbytes)])


def _aligned(view: memoryview) -> bool:
    address = np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0
    return address % ALIGN == 0 and len(view) % ALIGN == 0


def write_file(path: str, data: memoryview, *, direct: bool | None = None) -> str:
    """Writes ``data`` to ``path`` and fsyncs it; returns ``"direct"`` or ``"buffered"``.

    A filesystem that refuses ``O_DIRECT`` (EINVAL at open or at a write: older tmpfs, some
    FUSE) gets the same bytes written again, buffered; any other error is raised."""
    return _direct_or_buffered(_write, path, data, direct)


def _direct_or_buffered(io_fn, path: str, view: memoryview, direct: bool | None) -> str:
    """``io_fn(path, view, O_DIRECT)``, or again with no flag where EINVAL refuses it."""
    direct = direct_io_enabled() if direct is None else direct
    if direct and _aligned(view):
        try:
            io_fn(path, view, os.O_DIRECT)
            return "direct"
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    io_fn(path, view, 0)
    return "buffered"


def _write(path: str, data: memoryview, extra_flags: int) -> None:
    # Sequential writes of whole chunks: with O_DIRECT every offset stays aligned.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra_flags, 0o644)
    try:
        at = 0
        while at < len(data):
            at += os.write(fd, data[at : at + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str, count: int, dtype, *, direct: bool | None = None) -> np.ndarray:
    """The ``count`` items of ``dtype`` at the start of a file that ``write_file`` wrote.

    Refuses a file whose size is not the padded size of ``count`` items (truncated, or
    another array's)."""
    dtype = np.dtype(dtype)
    want = padded(count * dtype.itemsize)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"{path}: missing ({e.strerror})") from e
    if size != want:
        raise CheckpointError(
            f"{path} is corrupt: {size} bytes, expected {want} ({count} x {dtype} padded "
            f"to {ALIGN})"
        )
    out = aligned_empty(count, dtype)  # only once the size is known to be right
    _direct_or_buffered(_read, path, file_bytes(out), direct)
    return out


def _read(path: str, view: memoryview, extra_flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | extra_flags)
    try:
        f, at = io.FileIO(fd, closefd=False), 0  # unbuffered: reads land in ``view`` itself
        while at < len(view):
            n = f.readinto(view[at : at + _CHUNK])
            if not n:
                raise CheckpointError(f"{path}: ended after {at} of {len(view)} bytes")
            at += n
    finally:
        os.close(fd)


# ------------------------------------------------------------------- the orbax item


class RawArraysHandler(ocp.AsyncCheckpointHandler):
    """Saves ``{name: aligned_empty array}`` as ``<name>.bin`` files plus an index."""

    def _write_all(self, directory, arrays: dict) -> None:
        if jax.process_index() != 0:
            return
        index = {}
        for name, array in arrays.items():
            write_file(os.path.join(os.fspath(directory), name + SUFFIX), file_bytes(array))
            index[name] = {"dtype": str(array.dtype), "count": int(array.size)}
        with open(os.path.join(os.fspath(directory), INDEX), "w") as f:
            json.dump(index, f, sort_keys=True)

    async def async_save(self, directory, args: RawArraysSave):
        arrays = dict(args.arrays)

        async def commit():
            self._write_all(directory, arrays)

        return [ocp.future.CommitFutureAwaitingContractedSignals(commit(), name="raw_arrays")]

    def save(self, directory, args: RawArraysSave):
        self._write_all(directory, dict(args.arrays))

    def restore(self, directory, args: RawArraysRestore | None = None) -> dict:
        """Every array of the index (or those ``args.counts`` names, checked against it)."""
        directory = os.fspath(directory)
        try:
            with open(os.path.join(directory, INDEX)) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory}: unreadable array index ({e})") from e
        want = dict(args.counts) if args is not None and args.counts is not None else None
        if want is not None:
            for name, (dtype, count) in want.items():
                got = index.get(name)
                if got != {"dtype": dtype, "count": count}:
                    raise CheckpointError(
                        f"{directory} is corrupt: array {name!r} is {got}, the layout says "
                        f"{count} x {dtype}"
                    )
        names = want if want is not None else index
        return {
            n: read_file(os.path.join(directory, n + SUFFIX), index[n]["count"], index[n]["dtype"])
            for n in names
        }


@ocp.args.register_with_handler(RawArraysHandler, for_save=True)
@dataclasses.dataclass
class RawArraysSave(ocp.args.CheckpointArgs):
    arrays: dict  # name -> 1-D array from aligned_empty


@ocp.args.register_with_handler(RawArraysHandler, for_restore=True)
@dataclasses.dataclass
class RawArraysRestore(ocp.args.CheckpointArgs):
    counts: dict | None = None  # name -> (dtype name, item count); None: all in the index

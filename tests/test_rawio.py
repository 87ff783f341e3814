"""Raw array files for packed checkpoints: O_DIRECT, its buffered fallback, and bad files."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from jaxrepro.checkpoints import Checkpoints, rawio
from jaxrepro.errors import CheckpointError


def _filled(count, dtype, seed=0):
    a = rawio.aligned_empty(count, dtype)
    a[...] = np.random.default_rng(seed).integers(-1000, 1000, count).astype(dtype)
    return a


@pytest.mark.parametrize("count", [0, 1, 1023, 1024, 1025, 300_000])
def test_aligned_buffers_are_aligned_and_zero_padded(count):
    a = _filled(count, np.float32)
    view = rawio.file_bytes(a)
    assert a.shape == (count,) and a.dtype == np.float32
    assert len(view) % rawio.ALIGN == 0 and len(view) - a.nbytes < rawio.ALIGN
    data = np.frombuffer(view, np.uint8)
    assert data.ctypes.data % rawio.ALIGN == 0 or count == 0
    assert np.array_equal(data[: a.nbytes].view(np.float32), a)
    assert not data[a.nbytes :].any()


def test_file_bytes_refuses_arrays_it_did_not_allocate():
    for other in (np.zeros(10, np.float32), np.zeros((4, 4), np.float32)[:, 0]):
        with pytest.raises(ValueError, match="aligned_empty"):
            rawio.file_bytes(other)
    big = rawio.aligned_empty(5000, np.uint8)
    with pytest.raises(ValueError, match="aligned_empty"):
        rawio.file_bytes(big[:10].view(np.uint8).reshape(2, 5))


def _spy_open(monkeypatch, refuse_direct: int | None = None):
    """Records the flags of every os.open; optionally fails O_DIRECT opens with an errno."""
    calls, real = [], os.open

    def spy(path, flags, *a):
        calls.append(flags)
        if refuse_direct is not None and flags & getattr(os, "O_DIRECT", 0):
            raise OSError(refuse_direct, os.strerror(refuse_direct), path)
        return real(path, flags, *a)

    monkeypatch.setattr(rawio.os, "open", spy)
    return calls


needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")


@needs_direct
def test_direct_and_buffered_writes_give_the_same_file(tmp_path, monkeypatch):
    a = _filled(70_001, np.int32)
    calls = _spy_open(monkeypatch)
    mode = rawio.write_file(str(tmp_path / "d.bin"), rawio.file_bytes(a))
    assert calls[0] & os.O_DIRECT  # tried first
    assert mode == ("direct" if len(calls) == 1 else "buffered")
    assert rawio.write_file(str(tmp_path / "b.bin"), rawio.file_bytes(a), direct=False) == (
        "buffered"
    )
    assert not calls[-1] & os.O_DIRECT
    assert (tmp_path / "d.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    for direct in (True, False):
        got = rawio.read_file(str(tmp_path / "d.bin"), a.size, np.int32, direct=direct)
        assert np.array_equal(got, a)


@needs_direct
def test_a_filesystem_refusing_o_direct_gets_a_buffered_write(tmp_path, monkeypatch):
    a = _filled(5000, np.float32)
    calls = _spy_open(monkeypatch, refuse_direct=errno.EINVAL)
    assert rawio.write_file(str(tmp_path / "x.bin"), rawio.file_bytes(a)) == "buffered"
    assert [bool(f & os.O_DIRECT) for f in calls] == [True, False]
    assert np.array_equal(rawio.read_file(str(tmp_path / "x.bin"), a.size, np.float32), a)
    # any other error is the caller's, not a reason to write another way
    _spy_open(monkeypatch, refuse_direct=errno.ENOSPC)
    with pytest.raises(OSError, match="No space"):
        rawio.write_file(str(tmp_path / "y.bin"), rawio.file_bytes(a))


@needs_direct
def test_a_write_refused_after_open_is_written_again_buffered(tmp_path, monkeypatch):
    a = _filled(5000, np.float32)
    real, calls = os.write, []

    def refuse_first(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(rawio.os, "write", refuse_first)
    assert rawio.write_file(str(tmp_path / "x.bin"), rawio.file_bytes(a)) == "buffered"
    assert len(calls) == 2
    assert np.array_equal(rawio.read_file(str(tmp_path / "x.bin"), a.size, np.float32), a)


def test_direct_io_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXREPRO_DIRECT_IO", "0")
    calls = _spy_open(monkeypatch)
    a = _filled(100, np.float32)
    assert rawio.write_file(str(tmp_path / "x.bin"), rawio.file_bytes(a)) == "buffered"
    assert not any(f & getattr(os, "O_DIRECT", 0) for f in calls)


def test_bad_files_are_refused_by_name(tmp_path):
    a = _filled(3000, np.float32)
    path = str(tmp_path / "x.bin")
    rawio.write_file(path, rawio.file_bytes(a))
    with pytest.raises(CheckpointError, match=r"x.bin is corrupt: 12288 bytes, expected 16384"):
        rawio.read_file(path, 4000, np.float32)  # another array's size
    # a corrupt index's absurd count is refused by the size, before any allocation
    with pytest.raises(CheckpointError, match=r"x.bin is corrupt: 12288 bytes"):
        rawio.read_file(path, 10**15, np.float32)
    with pytest.raises(CheckpointError, match=r"nope.bin: missing"):
        rawio.read_file(str(tmp_path / "nope.bin"), 3000, np.float32)


def test_checkpoint_items_check_their_index(tmp_path):
    import jax.numpy as jnp

    ckpts = Checkpoints(str(tmp_path / "ck"))
    tree = {"w": jnp.arange(10.0), "n": jnp.asarray(3, jnp.int32)}
    ckpts.save(1, tree, {})
    ckpts.wait()
    item = tmp_path / "ck" / "1" / "packed"
    assert sorted(p.name for p in item.glob("*.bin")) == ["float32.bin", "int32.bin"]
    handler = rawio.RawArraysHandler()
    got = handler.restore(str(item))  # self-describing: no layout needed
    assert np.array_equal(got["float32"], np.arange(10.0, dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"array 'float32' is .*the layout says 11 x float32"):
        handler.restore(str(item), rawio.RawArraysRestore({"float32": ("float32", 11)}))
    (item / rawio.INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint 1 .*unreadable array index"):
        ckpts.restore(1, tree)
    ckpts.close()

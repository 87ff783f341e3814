"""Stable hashes of parameter trees: the fingerprints of run.json and checkpoint manifests."""

from __future__ import annotations

import hashlib
import zlib

import jax
import numpy as np


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_bytes(leaf) -> tuple[str, tuple, np.ndarray]:
    """(dtype, shape, the bytes as a flat uint8 view: no copy of a contiguous array)."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    arr = np.ascontiguousarray(np.asarray(leaf))
    return str(arr.dtype), arr.shape, arr.reshape(-1).view(np.uint8)


def leaf_hashes(tree) -> dict[str, str]:
    """sha256 of every leaf (dtype, shape and bytes), keyed by its path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype, shape, data = _leaf_bytes(leaf)
        h = hashlib.sha256(f"{dtype}{shape}".encode())
        h.update(data)
        out[path_str(path)] = h.hexdigest()
    return out


# Checkpoint manifests: which checksum, by the name recorded in a checkpoint's meta.
MANIFEST_ALGOS = ("crc32", "sha256")


def leaf_checksums(tree, algo: str = "crc32") -> dict[str, str]:
    """Per-leaf checksums (dtype, shape and bytes) keyed by path: a checkpoint's manifest.

    ``crc32`` (the default) catches corruption -- any flipped byte or burst up to 32 bits,
    a truncated or misplaced array -- at ~6x the speed of sha256 (0.04 vs 0.24 s for a
    ResNet-50 state with its Adam moments); ``sha256`` reads older checkpoints. Identity of
    runs (run.json's hashes, the audit's final states) stays on sha256 (``tree_hash``).
    """
    if algo == "sha256":
        return leaf_hashes(tree)
    if algo != "crc32":
        raise ValueError(f"unknown manifest checksum {algo!r}; known: {', '.join(MANIFEST_ALGOS)}")
    return {path_str(p): crc32(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def crc32(leaf) -> str:
    """One leaf's manifest checksum (``leaf_checksums``); releases the GIL while it reads."""
    dtype, shape, data = _leaf_bytes(leaf)
    return f"crc32:{zlib.crc32(data, zlib.crc32(f'{dtype}{shape}'.encode())):08x}"


def tree_hash(tree) -> str:
    """One sha256 over all leaves in sorted path order; equal iff every bit is equal."""
    h = hashlib.sha256()
    for path, digest in sorted(leaf_hashes(tree).items()):
        h.update(path.encode())
        h.update(digest.encode())
    return h.hexdigest()

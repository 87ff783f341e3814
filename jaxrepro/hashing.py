"""Stable hashes of parameter trees: the fingerprints of run.json and checkpoint manifests."""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_bytes(leaf) -> tuple[str, tuple, bytes]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    arr = np.ascontiguousarray(np.asarray(leaf))
    return str(arr.dtype), arr.shape, arr.tobytes()


def leaf_hashes(tree) -> dict[str, str]:
    """sha256 of every leaf (dtype, shape and bytes), keyed by its path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype, shape, data = _leaf_bytes(leaf)
        h = hashlib.sha256(f"{dtype}{shape}".encode())
        h.update(data)
        out[path_str(path)] = h.hexdigest()
    return out


def tree_hash(tree) -> str:
    """One sha256 over all leaves in sorted path order; equal iff every bit is equal."""
    h = hashlib.sha256()
    for path, digest in sorted(leaf_hashes(tree).items()):
        h.update(path.encode())
        h.update(digest.encode())
    return h.hexdigest()

"""Matmuls whose summation order does not depend on the CPU's caches (portable mode).

XLA:CPU runs a matmul through Eigen, which cuts the contraction into blocks of ``kc``
terms sized from the L1 data cache and adds the blocks' partial sums into the result
(jaxrepro/machine.py). ``dot(a, b, chunk)`` cuts the contraction itself into chunks of
``chunk`` terms, each one matmul of at most ``chunk`` terms (so one Eigen block on any CPU
whose block is at least that long), and adds the chunks' results in chunk order. Its
gradient is made of the same chunked matmuls, so the backward is portable too.

``chunk=0`` is a plain ``jnp.dot``: the native mode's program, bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def dot(a: jax.Array, b: jax.Array, chunk: int = 0) -> jax.Array:
    """``a @ b`` for 2-D ``a`` (m, k) and ``b`` (k, n); contraction chunked when ``chunk``."""
    if not chunk:
        return jnp.dot(a, b)
    return _chunked(a, b, chunk)  # also when k <= chunk: its gradient's matmuls may be longer


def _sum_of_chunks(a, b, chunk: int):
    k = a.shape[-1]
    if k <= chunk:
        return jnp.dot(a, b)
    full, rest = divmod(k, chunk)
    out_dtype = jnp.result_type(a, b)

    def body(i, acc):
        start = i * chunk
        ai = lax.dynamic_slice_in_dim(a, start, chunk, axis=1)
        bi = lax.dynamic_slice_in_dim(b, start, chunk, axis=0)
        return acc + jnp.dot(ai, bi).astype(out_dtype)

    acc = jnp.dot(a[:, :chunk], b[:chunk]).astype(out_dtype)
    acc = lax.fori_loop(1, full, body, acc)
    if rest:
        acc = acc + jnp.dot(a[:, full * chunk :], b[full * chunk :]).astype(out_dtype)
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked(a, b, chunk: int):
    return _sum_of_chunks(a, b, chunk)


def _chunked_fwd(a, b, chunk):
    return _sum_of_chunks(a, b, chunk), (a, b)


def _chunked_bwd(chunk, res, g):
    a, b = res
    da = dot(g, jnp.transpose(b), chunk).astype(a.dtype)
    db = dot(jnp.transpose(a), g, chunk).astype(b.dtype)
    return da, db


_chunked.defvjp(_chunked_fwd, _chunked_bwd)

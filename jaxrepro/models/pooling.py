"""Max-pooling: XLA's own, and a deterministic twin with a scatter-free gradient.

JAX differentiates ``lax.reduce_window(max)`` into an HLO ``select_and_scatter``.
GPUs have no deterministic implementation of it, so ``--xla_gpu_deterministic_ops``
refuses a model that uses it. ``max_pool_deterministic`` has the same forward (the very
same ``reduce_window``) and a ``jax.custom_vjp`` backward made of compares, pads and
adds in a fixed order, which gives bit-for-bit the gradient that XLA:CPU's
``select_and_scatter`` gives:

* JAX pads the input with -inf *before* ``select_and_scatter``, so padded cells are
  ordinary window candidates (a gradient that lands on one is dropped).
* the select function is ``a >= b`` applied in row-major window order, starting from
  the window's first cell: the current choice is kept unless ``not (current >= next)``.
  So among tied maxima the first in row-major order wins, and a NaN is taken over
  anything (emulated exactly, NaN included).
* the scatter adds, starting from +0.0, the output cotangents in row-major order of the
  output positions; for one input cell that is descending order of window offsets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.fusion import stored

MAXPOOL_IMPLS = ("lax", "deterministic")


def _pads(padding: int) -> tuple[tuple[int, int], ...]:
    return ((0, 0), (padding, padding), (padding, padding), (0, 0))


def max_pool_lax(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """NHWC max-pool padded symmetrically with -inf (like torch's MaxPool2d)."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), _pads(padding)
    )


def _offset_slice(xp: jax.Array, di: int, dj: int, stride: int, out_h: int, out_w: int):
    """The window cell at offset (di, dj) of every output position."""
    n, _, _, c = xp.shape
    limit = (n, di + stride * (out_h - 1) + 1, dj + stride * (out_w - 1) + 1, c)
    return lax.slice(xp, (0, di, dj, 0), limit, (1, stride, stride, 1))


def _selected_offset(xp: jax.Array, window: int, stride: int, out_h: int, out_w: int):
    """Index (row-major in the window) of the cell that select_and_scatter picks."""
    sel_val = _offset_slice(xp, 0, 0, stride, out_h, out_w)
    sel_idx = jnp.zeros(sel_val.shape, jnp.int32)
    for k in range(1, window * window):
        cand = _offset_slice(xp, k // window, k % window, stride, out_h, out_w)
        # XLA's select is `current >= candidate`; the candidate wins when it is false.
        take = jnp.logical_not(sel_val >= cand)
        sel_val = jnp.where(take, cand, sel_val)
        sel_idx = jnp.where(take, jnp.int32(k), sel_idx)
    return sel_idx


def _place(contrib: jax.Array, di: int, dj: int, stride: int, padded_hw: tuple[int, int]):
    """Puts per-output values back at their (di, dj) cell of the padded input grid."""
    _, out_h, out_w, _ = contrib.shape
    high_h = padded_hw[0] - (di + stride * (out_h - 1) + 1)
    high_w = padded_hw[1] - (dj + stride * (out_w - 1) + 1)
    config = ((0, 0, 0), (di, high_h, stride - 1), (dj, high_w, stride - 1), (0, 0, 0))
    return lax.pad(contrib, jnp.zeros((), contrib.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_deterministic(
    x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1
) -> jax.Array:
    """``max_pool_lax`` with a backward pass that uses no scatter (see module doc)."""
    return max_pool_lax(x, window, stride, padding)


def _mp_fwd(x, window, stride, padding):
    return max_pool_lax(x, window, stride, padding), x


def _mp_bwd(window, stride, padding, x, dy):
    xp = jnp.pad(x, _pads(padding), constant_values=-jnp.inf)
    _, out_h, out_w, _ = dy.shape
    sel_idx = _selected_offset(xp, window, stride, out_h, out_w)
    # Stored, not fused into the nine reads below, each of which would recompute it.
    sel_idx = stored(sel_idx.astype(jnp.int8 if window * window <= 127 else jnp.int32))
    padded_hw = xp.shape[1:3]
    dxp = jnp.zeros(xp.shape, dy.dtype)
    # Descending offsets = ascending output positions for any one input cell: the
    # order in which select_and_scatter accumulates (float addition is not associative).
    for k in reversed(range(window * window)):
        contrib = jnp.where(sel_idx == k, dy, jnp.zeros((), dy.dtype))
        dxp = dxp + _place(contrib, k // window, k % window, stride, padded_hw)
    h, w = x.shape[1:3]
    return (dxp[:, padding : padding + h, padding : padding + w, :],)


max_pool_deterministic.defvjp(_mp_fwd, _mp_bwd)


def max_pool(x: jax.Array, impl: str, window: int = 3, stride: int = 2, padding: int = 1):
    """Max-pool with the chosen implementation ('lax' or 'deterministic')."""
    if impl == "lax":
        return max_pool_lax(x, window, stride, padding)
    if impl == "deterministic":
        return max_pool_deterministic(x, window, stride, padding)
    raise ValueError(f"unknown maxpool_impl {impl!r}; valid: {', '.join(MAXPOOL_IMPLS)}")

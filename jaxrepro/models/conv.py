"""Convolution as matmuls, with a hand-written backward that suits XLA:CPU.

``conv_matmul(x, kernel, stride, padding)`` computes ``lax.conv_general_dilated`` (NHWC x
HWIO, symmetric zero padding) as patch extraction plus one matmul. Three things make it
fast on XLA:CPU, where ``lax.conv`` is slow on small maps and matmuls run through a fast
library (measurements in results/bench/NOTES.md):

* **Live taps only.** A kernel tap whose window only ever covers zero padding (a 3x3 conv
  over a 1x1 map uses only its centre tap) is left out of the patches and the matmul:
  its products are exact zeros, so the result is the same convolution with fewer FLOPs.
  Its kernel gradient is exactly zero and is written as such.
* **Weight gradient with an explicit transpose of the narrower operand.** ``dW = P^T dY``
  contracts over batch x space, the major axis of both operands; left to itself XLA
  transposes ``dY`` inside the fusion that produces it (the BatchNorm backward), writing
  it column by column -- the single most expensive op of a 224x224 step. Written as
  ``transpose(P) @ dY`` (or ``(transpose(dY) @ P)^T`` when ``dY`` is narrower) the
  transpose goes into the matmul library's packing instead.
* **Input gradient** ``dP = dY W^T`` folded back onto the input by pads and adds in a
  fixed order (the transpose of the patch slicing), so it is deterministic.
* **Row blocks for large patch matrices.** Past ``BLOCK_ABOVE`` bytes of patches (the
  stem and the 3x3 convolutions of 56x56 and 28x28 maps at 224x224), the convolution runs
  as a ``lax.scan`` over blocks of output rows, each block's patches under
  ``BLOCK_BYTES``: the forward writes its rows of the output, the backward recomputes the
  block's patches from the saved input, adds its weight gradient to a running sum and
  its folded input gradient into the block's input rows, in block order. Same math, other
  summation order than the whole matrix (so other bits); smaller convolutions, among
  them every one of the 32x32 default, take the whole-matrix path unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models import contract


def _live(offsets: int, size: int, out: int, stride: int, padding: int) -> list[int]:
    """Kernel offsets along one axis whose window rows touch the real input."""
    live = []
    for d in range(offsets):
        rows = range(d, d + stride * (out - 1) + 1, stride)  # padded coordinates
        if any(padding <= r < padding + size for r in rows):
            live.append(d)
    return live


def _geometry(x_shape, k_shape, stride: int, padding: int):
    _, h, w, _ = x_shape
    kh, kw, _, _ = k_shape
    out_h = (h + 2 * padding - kh) // stride + 1
    out_w = (w + 2 * padding - kw) // stride + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"conv of a {h}x{w} map with a {kh}x{kw} kernel gives no output")
    rows = _live(kh, h, out_h, stride, padding)
    cols = _live(kw, w, out_w, stride, padding)
    taps = tuple((di, dj) for di in rows for dj in cols)
    return out_h, out_w, taps


def _slice_tap(xp, di: int, dj: int, stride: int, out_h: int, out_w: int):
    n, _, _, c = xp.shape
    limit = (n, di + stride * (out_h - 1) + 1, dj + stride * (out_w - 1) + 1, c)
    return lax.slice(xp, (0, di, dj, 0), limit, (1, stride, stride, 1))


def _pad(x, padding: int):
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _patches(x, taps, stride: int, padding: int, out_h: int, out_w: int):
    """(N*Ho*Wo, T*C) patches of the live taps, channel order (tap, c) like HWIO."""
    xp = _pad(x, padding)
    cols = [_slice_tap(xp, di, dj, stride, out_h, out_w) for di, dj in taps]
    p = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return p.reshape(-1, p.shape[-1])


def _live_kernel(kernel, taps):
    """The live taps' rows of the kernel as a (T*Cin, Cout) matrix."""
    _, _, cin, cout = kernel.shape
    if len(taps) == kernel.shape[0] * kernel.shape[1]:
        return kernel.reshape(-1, cout)
    return jnp.concatenate([kernel[di, dj] for di, dj in taps], axis=0).reshape(-1, cout)


# A patch matrix larger than BLOCK_ABOVE is made and used one block of output rows at a
# time, each block's patches at most BLOCK_BYTES (see ``_rows_per_block``). Measured on
# XLA:CPU (results/bench/NOTES.md); 0 turns blocking off.
BLOCK_ABOVE = 16 << 20
BLOCK_BYTES = 4 << 20


def conv_matmul(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, chunk: int = 0
) -> jax.Array:
    """The same convolution as ``lax.conv_general_dilated`` (NHWC, HWIO), as a matmul.

    ``chunk``: contractions of at most this many terms (portable mode, models/contract.py).
    """
    out_h, out_w, taps = _geometry(x.shape, kernel.shape, stride, padding)
    rows = _rows_per_block(x.shape, out_h, out_w, len(taps), jnp.dtype(x.dtype).itemsize)
    if rows < out_h:
        return _conv_blocked(x, kernel, stride, padding, rows, chunk)
    return _conv_whole(x, kernel, stride, padding, chunk)


def _rows_per_block(x_shape, out_h: int, out_w: int, n_taps: int, itemsize: int) -> int:
    """Output rows per block: all of them, or the largest divisor of ``out_h`` that fits.

    The patch matrix is ``n_taps`` times the input. Once it is tens of MiB (the stem and
    the 3x3 convolutions on 56x56 and 28x28 maps at 224x224), writing it and reading it
    back (forward, weight gradient) and folding the input gradient cost more than the
    matmuls; in blocks of a few MiB it stays in cache: 1.5-2x faster per convolution.
    Small patch matrices (every layer at 32x32, the 14x14 and 7x7 maps) are faster whole.
    """
    row_bytes = x_shape[0] * out_w * n_taps * x_shape[3] * itemsize
    if not BLOCK_ABOVE or n_taps == 1 or out_h * row_bytes <= BLOCK_ABOVE:
        return out_h
    fits = [r for r in range(1, out_h + 1) if out_h % r == 0 and r * row_bytes <= BLOCK_BYTES]
    return max(fits) if fits else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_whole(x: jax.Array, kernel: jax.Array, stride: int, padding: int, chunk: int):
    return _conv_fwd(x, kernel, stride, padding, chunk)[0]


def _conv_fwd(x, kernel, stride, padding, chunk):
    out_h, out_w, taps = _geometry(x.shape, kernel.shape, stride, padding)
    p = _patches(x, taps, stride, padding, out_h, out_w)
    y = contract.dot(p, _live_kernel(kernel, taps), chunk)
    # A zero-size array carries x's shape into the backward without keeping x alive.
    shape_only = jnp.zeros((*x.shape[:3], 0), x.dtype)
    return y.reshape(x.shape[0], out_h, out_w, kernel.shape[-1]), (shape_only, p, kernel)


def _weight_grad(p, dy2, chunk: int):
    """P^T dY with the narrower operand transposed explicitly (see module doc)."""
    if p.shape[1] <= dy2.shape[1]:
        return contract.dot(jnp.transpose(p), dy2, chunk)
    return jnp.transpose(contract.dot(jnp.transpose(dy2), p, chunk))


def _conv_bwd(stride, padding, chunk, res, dy):
    shape_only, p, kernel = res
    cin, cout = kernel.shape[2:]
    x_shape = (*shape_only.shape[:3], cin)
    _, out_h, out_w, _ = dy.shape
    _, _, taps = _geometry(x_shape, kernel.shape, stride, padding)
    dy2 = dy.reshape(-1, cout)
    dw = _full_kernel_grad(_weight_grad(p, dy2, chunk), kernel.shape, taps)
    dp = contract.dot(dy2, jnp.transpose(_live_kernel(kernel, taps)), chunk)
    dp = dp.reshape(x_shape[0], out_h, out_w, len(taps) * cin)
    return _fold(dp, x_shape, taps, stride, padding), dw.astype(kernel.dtype)


def _full_kernel_grad(dw_live, k_shape, taps):
    """The (T*Cin, Cout) gradient of the live taps as a kernel gradient (dead taps 0)."""
    kh, kw, cin, cout = k_shape
    dw_live = dw_live.reshape(len(taps), cin, cout)
    if len(taps) == kh * kw:
        return dw_live.reshape(k_shape)
    dw = jnp.zeros(k_shape, dw_live.dtype)
    for t, (di, dj) in enumerate(taps):
        dw = dw.at[di, dj].set(dw_live[t])
    return dw


def _fold(dp, x_shape, taps, stride: int, padding: int):
    """The transpose of ``_patches``: each tap's block padded back into place, summed."""
    n, h, w, c = x_shape
    hp, wp = h + 2 * padding, w + 2 * padding
    _, out_h, out_w, _ = dp.shape
    total = None
    for t, (di, dj) in enumerate(taps):
        block = dp[..., t * c : (t + 1) * c]
        high_h = hp - (di + stride * (out_h - 1) + 1)
        high_w = wp - (dj + stride * (out_w - 1) + 1)
        config = ((0, 0, 0), (di, high_h, stride - 1), (dj, high_w, stride - 1), (0, 0, 0))
        placed = lax.pad(block, jnp.zeros((), dp.dtype), config)
        total = placed if total is None else total + placed
    return total[:, padding : padding + h, padding : padding + w, :]


_conv_whole.defvjp(_conv_fwd, _conv_bwd)


# -- the same convolution, one block of output rows at a time


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_blocked(x, kernel, stride: int, padding: int, rows: int, chunk: int):
    return _blocked_fwd(x, kernel, stride, padding, rows, chunk)[0]


def _slab(xp, b, rows: int, stride: int, kh: int):
    """The padded input rows that output rows ``[b*rows, (b+1)*rows)`` read."""
    n, _, wp, c = xp.shape
    height = (rows - 1) * stride + kh
    return lax.dynamic_slice(xp, (0, b * rows * stride, 0, 0), (n, height, wp, c))


def _block_patches(xp, b, taps, rows: int, out_w: int, stride: int, kh: int):
    """The patches of output rows ``[b*rows, (b+1)*rows)`` (``xp`` already padded)."""
    return _patches(_slab(xp, b, rows, stride, kh), taps, stride, 0, rows, out_w)


def _blocked_fwd(x, kernel, stride, padding, rows, chunk):
    out_h, out_w, taps = _geometry(x.shape, kernel.shape, stride, padding)
    kh, cout = kernel.shape[0], kernel.shape[-1]
    xp = _pad(x, padding)
    k2 = _live_kernel(kernel, taps)

    def block(y, b):
        p = _block_patches(xp, b, taps, rows, out_w, stride, kh)
        yb = contract.dot(p, k2, chunk).reshape(x.shape[0], rows, out_w, cout)
        return lax.dynamic_update_slice(y, yb, (0, b * rows, 0, 0)), None

    y0 = jnp.zeros((x.shape[0], out_h, out_w, cout), jnp.result_type(x, kernel))
    y, _ = lax.scan(block, y0, jnp.arange(out_h // rows))
    return y, (x, kernel)


def _blocked_bwd(stride, padding, rows, chunk, res, dy):
    x, kernel = res
    kh, _, cin, cout = kernel.shape
    out_h, out_w, taps = _geometry(x.shape, kernel.shape, stride, padding)
    xp = _pad(x, padding)
    k2t = jnp.transpose(_live_kernel(kernel, taps))
    n, _, wp, _ = xp.shape
    slab_shape = (n, (rows - 1) * stride + kh, wp, cin)

    def block(carry, b):
        dw, dxp = carry
        p = _block_patches(xp, b, taps, rows, out_w, stride, kh)
        dyb = lax.dynamic_slice(dy, (0, b * rows, 0, 0), (n, rows, out_w, cout)).reshape(-1, cout)
        dw = dw + _weight_grad(p, dyb, chunk).astype(dw.dtype)
        dp = contract.dot(dyb, k2t, chunk).reshape(n, rows, out_w, len(taps) * cin)
        start = (0, b * rows * stride, 0, 0)
        g = lax.dynamic_slice(dxp, start, slab_shape) + _fold(dp, slab_shape, taps, stride, 0)
        return (dw, lax.dynamic_update_slice(dxp, g, start)), None

    # the running sum in float32 at least: bfloat16 would round it at every block
    dw0 = jnp.zeros((len(taps) * cin, cout), jnp.promote_types(kernel.dtype, jnp.float32))
    (dw_live, dxp), _ = lax.scan(block, (dw0, jnp.zeros_like(xp)), jnp.arange(out_h // rows))
    h, w = x.shape[1], x.shape[2]
    dx = dxp[:, padding : padding + h, padding : padding + w, :]
    return dx, _full_kernel_grad(dw_live, kernel.shape, taps).astype(kernel.dtype)


_conv_blocked.defvjp(_blocked_fwd, _blocked_bwd)

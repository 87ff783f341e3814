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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The same convolution as ``lax.conv_general_dilated`` (NHWC, HWIO), as a matmul."""
    return _conv_fwd(x, kernel, stride, padding)[0]


def _conv_fwd(x, kernel, stride, padding):
    out_h, out_w, taps = _geometry(x.shape, kernel.shape, stride, padding)
    p = _patches(x, taps, stride, padding, out_h, out_w)
    y = jnp.dot(p, _live_kernel(kernel, taps))
    # A zero-size array carries x's shape into the backward without keeping x alive.
    shape_only = jnp.zeros((*x.shape[:3], 0), x.dtype)
    return y.reshape(x.shape[0], out_h, out_w, kernel.shape[-1]), (shape_only, p, kernel)


def _weight_grad(p, dy2):
    """P^T dY with the narrower operand transposed explicitly (see module doc)."""
    if p.shape[1] <= dy2.shape[1]:
        return jnp.dot(jnp.transpose(p), dy2)
    return jnp.transpose(jnp.dot(jnp.transpose(dy2), p))


def _conv_bwd(stride, padding, res, dy):
    shape_only, p, kernel = res
    kh, kw, cin, cout = kernel.shape
    x_shape = (*shape_only.shape[:3], cin)
    _, out_h, out_w, _ = dy.shape
    _, _, taps = _geometry(x_shape, kernel.shape, stride, padding)
    dy2 = dy.reshape(-1, cout)
    dw_live = _weight_grad(p, dy2).reshape(len(taps), cin, cout)
    dw = jnp.zeros(kernel.shape, dw_live.dtype)
    if len(taps) == kh * kw:
        dw = dw_live.reshape(kernel.shape)
    else:
        for t, (di, dj) in enumerate(taps):
            dw = dw.at[di, dj].set(dw_live[t])
    dp = jnp.dot(dy2, jnp.transpose(_live_kernel(kernel, taps)))
    dp = dp.reshape(x_shape[0], out_h, out_w, len(taps) * cin)
    return _fold(dp, x_shape, taps, stride, padding), dw.astype(kernel.dtype)


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


conv_matmul.defvjp(_conv_fwd, _conv_bwd)

"""Convolution and linear head, laid out so torchvision weights port one to one.

``Conv`` keeps one parameter, ``kernel`` in HWIO, whatever the implementation:

* ``'lax'``: ``lax.conv_general_dilated`` (cuDNN / TPU convolutions are fast).
* ``'matmul'``: 1x1 convs as one matmul; kxk convs as explicit patches (strided slices
  of the padded input, concatenated on channels in the kernel's (h, w, i) order) and one
  matmul. XLA:CPU's convolution is slow on the small maps of a CIFAR-sized ResNet
  while its matmuls run through a fast library (FINDINGS.md: ~3x for ResNet-50 32x32).

Padding is always explicit and symmetric: 'SAME' on a stride-2 conv pads only
bottom/right, which shifts every window by one pixel against PyTorch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("lax", "matmul")

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
# fan_out = out_channels * kh * kw (HWIO: out axis -1, receptive field = H * W).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_init(key: jax.Array, shape, dtype=jnp.float32, *, fan_in: int) -> jax.Array:
    """torch.nn.Linear's default draw: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Holds for the weight (kaiming_uniform with a=sqrt(5)) and for the bias alike.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def conv_lax(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """NHWC x HWIO convolution through XLA's convolution op."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _patches(x: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """im2col by slicing: (N, Ho, Wo, kh*kw*C), channel order (h, w, c) like HWIO."""
    n, _, _, c = x.shape
    cols = []
    for di in range(kh):
        for dj in range(kw):
            limit = (n, di + stride * (out_h - 1) + 1, dj + stride * (out_w - 1) + 1, c)
            cols.append(lax.slice(x, (0, di, dj, 0), limit, (1, stride, stride, 1)))
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The same convolution as ``conv_lax``, as patch extraction plus one matmul."""
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = x.shape
    out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = _patches(x, kh, kw, stride, out_h, out_w)
    return jnp.einsum("nhwk,ko->nhwo", cols, kernel.reshape(kh * kw * cin, cout))


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, impl: str) -> jax.Array:
    """Dispatches to the chosen convolution implementation."""
    if impl == "lax":
        return conv_lax(x, kernel, stride, padding)
    if impl == "matmul":
        return conv_matmul(x, kernel, stride, padding)
    raise ValueError(f"unknown conv_impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")


class Conv(nn.Module):
    """Bias-free square convolution with explicit symmetric padding.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      stride: spatial stride.
      padding: zeros added on every side (torch's ``padding``).
      impl: 'lax' or 'matmul' (same parameters, same math).
      dtype: compute dtype; the kernel is stored in float32.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    impl: str = "lax"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return conv(x, kernel, self.stride, self.padding, self.impl)


class Head(nn.Module):
    """The classifier ``fc``: kernel (in, out) and bias, drawn like torch.nn.Linear."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]

        def init(key, shape, dtype):
            return torch_linear_init(key, shape, dtype, fan_in=fan_in)

        kernel = self.param("kernel", init, (fan_in, self.num_classes), self.param_dtype)
        bias = self.param("bias", init, (self.num_classes,), self.param_dtype)
        x = x.astype(self.dtype)
        return jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)

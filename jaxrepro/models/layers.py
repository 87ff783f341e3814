"""Convolution and linear head, laid out so torchvision weights port one to one.

``Conv`` keeps one parameter, ``kernel`` in HWIO, whatever the implementation:

* ``'lax'``: ``lax.conv_general_dilated`` (cuDNN / TPU convolutions are fast).
* ``'matmul'``: 1x1 convs as one matmul; kxk convs as explicit patches (strided slices
  of the padded input, concatenated on channels in the kernel's (h, w, i) order) and one
  matmul. XLA:CPU's convolution is slow on the small maps of a CIFAR-sized ResNet
  while its matmuls run through a fast library (docs/findings.md: ~3x for ResNet-50 32x32).
  It lives in conv.py: taps that only see padding are left out, and the backward is
  hand-written (results/bench/NOTES.md).

Padding is always explicit and symmetric: 'SAME' on a stride-2 conv pads only
bottom/right, which shifts every window by one pixel against PyTorch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models import contract
from jaxrepro.models import init as init_lib
from jaxrepro.models.conv import conv_matmul

CONV_IMPLS = ("lax", "matmul")

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
# fan_out = out_channels * kh * kw (HWIO: out axis -1, receptive field = H * W).
_he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """He-normal (fan_out) for HWIO kernels; recordable by ``models.init_variables``."""
    fan_out = shape[-1] * (math.prod(shape) / (shape[-2] * shape[-1]))  # as jax computes it
    return init_lib.normal_or_record(
        key, shape, dtype, 2.0 / fan_out, lambda: _he_normal_fan_out(key, shape, dtype)
    )


def torch_linear_init(key: jax.Array, shape, dtype=jnp.float32, *, fan_in: int) -> jax.Array:
    """torch.nn.Linear's default draw: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Holds for the weight (kaiming_uniform with a=sqrt(5)) and for the bias alike.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return init_lib.uniform_or_record(
        key, shape, dtype, -bound, bound,
        lambda: jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound),
    )  # fmt: skip


def conv_lax(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """NHWC x HWIO convolution through XLA's convolution op."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, impl: str, chunk: int = 0
) -> jax.Array:
    """Dispatches to the chosen convolution implementation (``chunk``: matmul only)."""
    if impl == "lax":
        return conv_lax(x, kernel, stride, padding)
    if impl == "matmul":
        return conv_matmul(x, kernel, stride, padding, chunk)
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
      chunk: contraction chunk of portable mode (contract.py); 0: plain matmuls.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    impl: str = "lax"
    dtype: jnp.dtype = jnp.float32
    chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return conv(x, kernel, self.stride, self.padding, self.impl, self.chunk)


class Head(nn.Module):
    """The classifier ``fc``: kernel (in, out) and bias, drawn like torch.nn.Linear."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    chunk: int = 0  # contraction chunk of portable mode (contract.py); 0: plain matmul

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]

        def init(key, shape, dtype):
            return torch_linear_init(key, shape, dtype, fan_in=fan_in)

        kernel = self.param("kernel", init, (fan_in, self.num_classes), self.param_dtype)
        bias = self.param("bias", init, (self.num_classes,), self.param_dtype)
        x = x.astype(self.dtype)
        return contract.dot(x, kernel.astype(self.dtype), self.chunk) + bias.astype(self.dtype)

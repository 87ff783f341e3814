"""BatchNorm that behaves like torch.nn.BatchNorm2d, with an optional fused backward.

Conventions (all chosen to match PyTorch, so ported weights and reference training agree):

* train mode normalises with the batch mean and the *biased* batch variance, computed
  in two passes (``mean((x - mean)^2)``, not ``E[x^2] - E[x]^2``: less cancellation);
* running statistics move as ``r = 0.9 * r + 0.1 * batch`` (Flax's momentum 0.9 is
  PyTorch's 0.1) and the running variance takes the *unbiased* batch variance, as
  torch does; a batch with one value per channel has no unbiased variance, so it is
  refused (torch refuses it too);
* epsilon 1e-5; statistics and normalisation in float32 whatever the compute dtype.

``impl='flax'`` lets JAX differentiate the plain formula. ``impl='fused'`` gives the
same function a ``jax.custom_vjp`` with the closed-form backward
``dx = inv * (g*dy - mean(g*dy) - xhat * mean(g*dy*xhat))``, which is far cheaper
than the autodiff graph on XLA:CPU (docs/findings.md: ~60 ms of a ~260 ms ResNet-50 step).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_IMPLS = ("flax", "fused")
_AXES = (0, 1, 2)  # NHWC: statistics over batch and space, one per channel


def batch_norm_train_plain(x, scale, bias, eps):
    """Train-mode BatchNorm, differentiated by JAX. Returns (y, mean, biased var)."""
    mean = jnp.mean(x, axis=_AXES)
    var = jnp.mean(jnp.square(x - mean), axis=_AXES)
    inv = jax.lax.rsqrt(var + eps)
    return (x - mean) * (inv * scale) + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_fused(x, scale, bias, eps):
    return batch_norm_train_plain(x, scale, bias, eps)


def _bn_fused_fwd(x, scale, bias, eps):
    mean = jnp.mean(x, axis=_AXES)
    xc = x - mean
    var = jnp.mean(jnp.square(xc), axis=_AXES)
    inv = jax.lax.rsqrt(var + eps)
    y = xc * (inv * scale) + bias
    return (y, mean, var), (xc, inv, scale)


def _bn_fused_bwd(eps, res, cotangents):
    del eps  # only the forward needs it; the residuals carry inv = rsqrt(var + eps)
    xc, inv, scale = res
    dy, dmean, dvar = cotangents
    n = xc.shape[0] * xc.shape[1] * xc.shape[2]
    xhat = xc * inv
    dbias = jnp.sum(dy, axis=_AXES)
    dscale = jnp.sum(dy * xhat, axis=_AXES)
    # d(loss)/d(xhat) = dy * scale; the sums above give its two batch means for free.
    g = scale * inv / n
    dx = g * (n * dy - dbias - xhat * dscale)
    # The mean and variance are outputs too (for running stats); honour their
    # cotangents so the VJP is exact even when something differentiates them.
    dx = dx + dmean / n + xc * (2.0 * dvar / n)
    return dx, dscale, dbias


_bn_fused.defvjp(_bn_fused_fwd, _bn_fused_bwd)


def batch_norm_train(x, scale, bias, eps, impl: str):
    """Train-mode BatchNorm (float32 in, float32 out) with the chosen backward."""
    eps = float(eps)
    if impl == "flax":
        return batch_norm_train_plain(x, scale, bias, eps)
    if impl == "fused":
        return _bn_fused(x, scale, bias, eps)
    raise ValueError(f"unknown bn_impl {impl!r}; valid: {', '.join(BN_IMPLS)}")


class BatchNorm(nn.Module):
    """torch-compatible BatchNorm over the channel axis of NHWC inputs.

    Attributes:
      momentum: Flax convention: running = momentum * running + (1 - momentum) * batch.
      epsilon: added to the variance.
      zero_scale: initialise ``scale`` to 0 (``zero_init_residual``) instead of 1.
      impl: 'flax' (autodiff backward) or 'fused' (custom_vjp backward).
      dtype: output dtype; statistics are computed in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_scale: bool = False
    impl: str = "flax"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        scale = self.param("scale", scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x = x.astype(jnp.float32)
        if not train:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
            return ((x - ra_mean.value) * (inv * scale) + bias).astype(self.dtype)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if n < 2:
            raise ValueError(
                f"BatchNorm in train mode needs more than 1 value per channel, got input "
                f"shape {x.shape} (batch * height * width = {n})"
            )
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.impl)
        if not self.is_initializing():
            m = self.momentum
            unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        return y.astype(self.dtype)

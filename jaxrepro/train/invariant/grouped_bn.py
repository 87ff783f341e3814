"""BatchNorm over a list of groups with global-batch statistics, combined in a fixed order.

Same function as ``jaxrepro.models.batchnorm`` in train mode (batch mean, biased batch
variance in two passes, epsilon inside the rsqrt), but the batch is given as this
device's list of groups, and every sum over the batch is a per-group sum followed by
``reduce.combine`` (gathered in group order, fixed pairwise tree over the G groups):

* forward: ``mean = tree(sum x_g) / n``; ``var = tree(sum (x_g - mean)^2) / n``;
* backward (``jax.custom_vjp``): per group ``db_g = sum dy_g`` and ``ds_g = sum dy_g*xhat_g``,
  combined the same way into the global ``db``, ``ds``, then per group
  ``dx_g = scale*inv/n * (n*dy_g - db - xhat_g*ds)``; the scale and bias cotangents are
  the *per-group* ``ds_g``, ``db_g`` (each group owns a copy of the weights; the step
  combines those copies' gradients with everything else).

Autodiff of the forward would transpose the all_gather into a reduce-scatter, whose
summation order belongs to the runtime: the custom backward is what keeps the bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrepro.train.invariant import reduce

_AXES = (0, 1, 2)  # NHWC: statistics over batch and space, one per channel


def total_count(xs, axis_name: str | None) -> int:
    """Values per channel in the global batch: per-group count x groups on all devices."""
    per_group = xs[0].shape[0] * xs[0].shape[1] * xs[0].shape[2]
    devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    return per_group * len(xs) * devices


def _forward(xs, scales, biases, eps, axis_name):
    n = jnp.float32(total_count(xs, axis_name))
    mean = reduce.combine([jnp.sum(x, axis=_AXES) for x in xs], axis_name) / n
    xcs = [x - mean for x in xs]
    sq = [jnp.sum(jnp.square(xc), axis=_AXES) for xc in xcs]
    var = reduce.combine(sq, axis_name) / n
    inv = jax.lax.rsqrt(var + eps)
    ys = [xc * (inv * s) + b for xc, s, b in zip(xcs, scales, biases, strict=True)]
    return (ys, mean, var), (xcs, inv, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_batch_norm(xs, scales, biases, eps: float, axis_name: str | None):
    """Train-mode BatchNorm of a batch given as groups.

    Args:
      xs: this device's groups, float32 [n_g, H, W, C] each (all the same shape).
      scales: per-group copies of the BN scale [C] (same values, separate inputs).
      biases: per-group copies of the BN bias [C].
      eps: added to the variance.
      axis_name: the mesh axis the other groups live on, or None (all groups here).

    Returns:
      (ys, mean, var): the normalised groups, and the global batch mean and biased
      variance (identical on every device and layout, for the running statistics).
    """
    return _forward(xs, scales, biases, eps, axis_name)[0]


def _fwd(xs, scales, biases, eps, axis_name):
    return _forward(xs, scales, biases, eps, axis_name)


def _bwd(eps, axis_name, res, cotangents):
    del eps  # inv = rsqrt(var + eps) is a residual
    xcs, inv, scales = res
    dys, dmean, dvar = cotangents
    n = total_count(xcs, axis_name)
    xhats = [xc * inv for xc in xcs]
    dbs = [jnp.sum(dy, axis=_AXES) for dy in dys]
    dss = [jnp.sum(dy * xh, axis=_AXES) for dy, xh in zip(dys, xhats, strict=True)]
    # One gather for both sums: rows are [db_g, ds_g], combined by the same tree.
    both = reduce.combine([jnp.stack([db, ds]) for db, ds in zip(dbs, dss, strict=True)], axis_name)
    db, ds = both[0], both[1]
    dxs = []
    for dy, xh, xc, s in zip(dys, xhats, xcs, scales, strict=True):
        g = s * inv / n
        dx = g * (n * dy - db - xh * ds)
        # mean and var are outputs too (running statistics, usually behind stop_gradient,
        # so these are zeros); honour them so the VJP is exact whatever uses them.
        dxs.append(dx + dmean / n + xc * (2.0 * dvar / n))
    return dxs, dss, dbs


grouped_batch_norm.defvjp(_fwd, _bwd)


def running_update(ra_mean, ra_var, mean, var, n: int, momentum: float):
    """torch-style running statistics from the global batch statistics (unbiased var)."""
    if n < 2:
        raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got {n}")
    unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
    new_mean = momentum * ra_mean + (1.0 - momentum) * jax.lax.stop_gradient(mean)
    new_var = momentum * ra_var + (1.0 - momentum) * unbiased
    return new_mean, new_var

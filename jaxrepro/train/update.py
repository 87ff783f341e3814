"""The optimizer update of a train step, guarded by ``lax.cond`` instead of selects.

``train_step`` applies the update only when the loss and gradients are finite. Written as
``jnp.where(apply, new, old)`` on every leaf of params and Adam state, XLA:CPU keeps the
old and new trees apart: it copies every donated Adam moment before updating it in
place, materialises the updates, and runs a select over ~3 x 94 MB for ResNet-50 -- a
step's tail then costs ~2.5x PyTorch's Adam (results/bench/NOTES.md). Under
``lax.cond`` the skipped branch costs nothing and the taken one updates the donated
buffers in place.

    params, opt_state, update_norm = guarded_update(tx, params, opt_state, grads, apply)

``update_norm=False`` leaves out the norm of the updates (returned as NaN): computing it
makes XLA store the updates, which is most of what remains of the tail on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax


def guarded_update(tx, params, opt_state, grads, apply, *, update_norm: bool = True, controls=None):
    """``tx``'s update applied when ``apply`` (a scalar bool), else the inputs unchanged.

    Args:
      tx: an optax GradientTransformation.
      params, opt_state, grads: pytrees as ``tx.update`` takes them.
      apply: scalar bool array: whether to take the step.
      update_norm: whether to compute the global norm of the applied update.
      controls: None, or ``train.step.step_controls``: ``[lr_scale, clip_norm]``. The
        gradient is clipped to global norm ``clip_norm`` and the learning rate multiplied
        by ``lr_scale`` (``tx`` built by train/optimizer.py); (1, inf) gives the same bits
        as no controls.

    Returns:
      ``(params, opt_state, norm)``: norm is that of the update (0.0 when skipped; NaN
      when ``update_norm`` is False).
    """
    apply = jnp.asarray(apply)
    if apply.shape != () or apply.dtype != jnp.bool_:
        raise ValueError(f"apply must be a scalar bool, got {apply.dtype}{apply.shape}")

    def take(operand):
        p, o, g = operand
        if controls is None:
            updates, o = tx.update(g, o, p)
        else:
            lr_scale, clip_norm = controls[0], controls[1]
            g = _clipped(g, clip_norm)
            updates, o = tx.update(g, o, p, lr_scale=lr_scale)
        norm = optax.tree.norm(updates) if update_norm else jnp.float32(jnp.nan)
        return optax.apply_updates(p, updates), o, jnp.asarray(norm, jnp.float32)

    def skip(operand):
        p, o, _ = operand
        return p, o, jnp.float32(0.0 if update_norm else jnp.nan)

    return lax.cond(apply, take, skip, (params, opt_state, grads))


def _clipped(grads, clip_norm):
    """``grads`` scaled to global norm ``clip_norm`` when longer; with inf they pass as they
    are (a cond: the clipping branch, and its own norm of the gradient, only run when
    asked for; the step's logged gradient norm is computed apart, as without controls)."""

    def clip(g):
        norm = optax.tree.norm(g)
        factor = jnp.minimum(1.0, clip_norm / norm)
        return jax.tree.map(lambda x: x * factor.astype(x.dtype), g)

    return lax.cond(jnp.isfinite(clip_norm), clip, lambda g: g, grads)
